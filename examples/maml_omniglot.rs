//! MAML on Omniglot-shaped few-shot tasks through the library API: the
//! embedded synthetic glyphs (1×28×28, no download), a Conv-4, exact MAML and
//! Adam, then accuracy on held-out tasks before and after meta-training.
//!
//!     cargo run --release --example maml_omniglot
//!     cargo run --release --example maml_omniglot -- head   # ANIL: adapt the head only
//!
//! For the real Omniglot archives swap `synthetic::split` for
//! `DatasetSpec::standard(DatasetKind::Omniglot, None).load_split`.

use std::sync::Arc;

use anyhow::Result;
use metagrad::data::synthetic;
use metagrad::data::{EpisodeSampler, EpisodeShape};
use metagrad::prelude::*;

/// Mean query accuracy after adapting to `n` tasks from `sampler`.
fn accuracy(learner: &MetaLearner<Conv4, Cpu>, sampler: &mut EpisodeSampler, n: usize) -> f64 {
    let inner = InnerLoop { steps: 3, ..learner.inner };
    (0..n).map(|_| learner.evaluate(&sampler.next_episode().task(), &inner).1.unwrap_or(0.0)).sum::<f64>() / n as f64
}

fn main() -> Result<()> {
    let device = Default::default();
    let shape = EpisodeShape { way: 5, shot: 1, queries: 5 };
    let mut train = EpisodeSampler::new(Arc::new(synthetic::split("train", 0, false)?), shape, 1)?;
    let mut test = EpisodeSampler::new(Arc::new(synthetic::split("test", 0, false)?), shape, 2)?;

    // The model is a function of named parameters (conv1.weight, …, head.bias).
    let model = Conv4::omniglot(shape.way);
    let theta = model.init::<Cpu>(0, Precision::F32, &device);
    // ANIL: the inner loop adapts the linear head only; the trunk still
    // learns through the exact hypergradient, and runs once per task.
    let head_only = std::env::args().nth(1).as_deref() == Some("head");
    let inner = InnerLoop { adapted: if head_only { Adapted::Last(2) } else { Adapted::All }, ..InnerLoop::new(1, 0.4) };
    let mut learner = MetaLearner::new(model, theta, Mode::Maml, inner, 1e-3)?;

    let before = accuracy(&learner, &mut test, 50);
    let start = std::time::Instant::now();
    for step in 1..=60 {
        let tasks: Vec<Task> = (0..8).map(|_| train.next_episode().task()).collect();
        let batch: Vec<&Task> = tasks.iter().collect();
        // Exact MAML meta-gradient over the meta-batch, then one Adam step.
        let scores = learner.step(&batch);
        if step % 20 == 0 {
            println!("step {step}: query loss {:.3}, accuracy {:.3}", scores.mean_loss(), scores.mean_accuracy().unwrap_or(0.0));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let after = accuracy(&learner, &mut test, 50);
    let what = if head_only { "head-only MAML (ANIL)" } else { "MAML" };
    println!("{what}: held-out 5-way 1-shot accuracy {:.1} % before, {:.1} % after 60 meta-iterations ({seconds:.1} s)", 100.0 * before, 100.0 * after);

    // Fast weights for one task, as named parameters.
    let task = test.next_episode().task();
    let fast = learner.adapt(&task.support);
    let logits = learner.predict(&fast, &task.query);
    println!("adapted {} tensors ({}: {:?}); query logits {:?}", fast.len(), fast.names()[0], fast[0].dims(), logits.dims());
    Ok(())
}
