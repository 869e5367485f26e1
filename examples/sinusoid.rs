//! The sinusoid regression of Finn et al. 2017 §5.1 through the library: an
//! MLP (1 → 40 → 40 → 1, ReLU) meta-trained with MAML (K = 10 points, one
//! inner step of α = 0.01, meta-batch 25, Adam 1e-3), against the same MLP
//! pre-trained jointly on all tasks. Both are then fine-tuned on K = 10
//! points of unseen sinusoids; MAML's error after one step is far below the
//! pre-trained network's after ten, as in the paper's Figure 2.
//!
//!     cargo run --release --example sinusoid -- [ITERATIONS] [OUT.png]

use anyhow::Result;
use metagrad::autodiff::diff::value_and_grad;
use metagrad::data::sinusoid::{Sinusoid, SinusoidTasks};
use metagrad::hypergrad::TaskLoss;
use metagrad::prelude::*;
use metagrad::train::plot::{Series, xy_plot};

const K: usize = 10;
const META_BATCH: usize = 25;

/// Mean query MSE over test tasks after `steps` gradient steps of size `lr`.
fn test_mse(learner: &MetaLearner<Mlp, Cpu>, tasks: &[(Sinusoid, Task)], steps: usize, lr: f64) -> f64 {
    let inner = InnerLoop::new(steps, lr);
    tasks.iter().map(|(_, task)| learner.evaluate(task, &inner).0).sum::<f64>() / tasks.len() as f64
}

/// The network's curve on [−5, 5] after fine-tuning on a task's support points.
fn curve(learner: &MetaLearner<Mlp, Cpu>, task: &Task, steps: usize, lr: f64, xs: &[f64]) -> Vec<(f64, f64)> {
    let fast = learner.adapt_with(&task.support, &InnerLoop::new(steps, lr));
    let grid = Sinusoid { amplitude: 0.0, phase: 0.0 }.examples(xs);
    xs.iter().copied().zip(learner.predict(&fast, &grid).to_vec()).collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let iterations: usize = args.get(1).map_or(Ok(5000), |a| a.parse())?;
    let out = args.get(2).map_or("sinusoid.png", String::as_str);
    let device = Default::default();
    let model = Mlp::sinusoid();
    let theta = model.init::<Cpu>(0, Precision::F32, &device);
    let mut maml = MetaLearner::new(model.clone(), theta.clone(), Mode::Maml, InnerLoop::new(1, 0.01), 1e-3)?;
    maml.batching = Batching::Stacked; // 25 small MLPs as one batched network
    // The baseline: the same network trained to regress every task's points at once.
    let mut pretrained = MetaLearner::new(model.clone(), theta, Mode::Maml, InnerLoop::new(1, 0.02), 1e-3)?;

    let mut stream = SinusoidTasks::new(1);
    for step in 1..=iterations {
        let tasks: Vec<Task> = (0..META_BATCH).map(|_| stream.next_task(K, K).1).collect();
        let scores = maml.step(&tasks.iter().collect::<Vec<_>>());
        let pooled = Examples::concat(&tasks.iter().map(|t| &t.support).collect::<Vec<_>>());
        let (_, grad) = value_and_grad(&TaskLoss::single(&model, &pooled, Precision::F32, &device), &pretrained.params);
        pretrained.apply(&grad);
        if step % 1000 == 0 {
            println!("step {step}: MAML post-update query MSE {:.3}", scores.mean_loss());
        }
    }

    let mut test = SinusoidTasks::new(2);
    let tasks: Vec<(Sinusoid, Task)> = (0..200).map(|_| test.next_task(K, 100)).collect();
    println!("mean squared error on 200 unseen sinusoids, K = {K}, after fine-tuning steps:");
    println!("{:>28} {:>8} {:>8} {:>8}", "", "0", "1", "10");
    for (name, learner, lr) in [("MAML (α = 0.01)", &maml, 0.01), ("pre-trained (step 0.02)", &pretrained, 0.02)] {
        let [a, b, c] = [0, 1, 10].map(|s| test_mse(learner, &tasks, s, lr));
        println!("{name:>28} {a:>8.3} {b:>8.3} {c:>8.3}");
    }

    let (sinusoid, task) = &tasks[0];
    let xs: Vec<f64> = (0..=200).map(|i| -5.0 + i as f64 * 0.05).collect();
    let series = vec![
        Series { label: "ground truth".into(), points: xs.iter().map(|&x| (x, sinusoid.at(x))).collect(), markers: false },
        Series { label: format!("{K} points used for fine-tuning"), points: task.support.inputs.iter().zip(task.support.targets.to_rows()).map(|(&x, y)| (f64::from(x), y)).collect(), markers: true },
        Series { label: "MAML, before the update".into(), points: curve(&maml, task, 0, 0.01, &xs), markers: false },
        Series { label: "MAML, after 1 step".into(), points: curve(&maml, task, 1, 0.01, &xs), markers: false },
        Series { label: "MAML, after 10 steps".into(), points: curve(&maml, task, 10, 0.01, &xs), markers: false },
        Series { label: "pre-trained, after 10 steps".into(), points: curve(&pretrained, task, 10, 0.02, &xs), markers: false },
    ];
    xy_plot(&series, &format!("Sinusoid regression, K = {K}, after {iterations} meta-iterations"), ("x", "y"), std::path::Path::new(out))?;
    println!("wrote {out}");
    Ok(())
}
