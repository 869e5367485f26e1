//! Meta learning-rate schedules: PyTorch's formulas, Adam taking the
//! scheduled rate at the right step, config errors, and a resumed run that
//! continues its schedule bit for bit.

use std::path::Path;

use metagrad::learner::{MetaAdam, MetaLrSchedule};
use metagrad::train::config::Config;
use metagrad::train::read_metrics;

use crate::common::*;
use crate::train::{err, metagrad, ok, small_config, temp};

#[test]
fn schedules_follow_pytorchs_cosine_annealing_and_multistep_rules() {
    let cosine = MetaLrSchedule::Cosine { steps: 100, min_lr: 1e-4 };
    // CosineAnnealingLR: η_min + (η_max − η_min)(1 + cos(π t / T)) / 2.
    for (taken, expected) in [(0, 1e-3), (25, 1e-4 + 9e-4 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0), (50, 5.5e-4), (100, 1e-4), (500, 1e-4)] {
        let rate = cosine.rate(1e-3, taken);
        assert!(relative_error(&[rate], &[expected]) <= 1e-15, "cosine after {taken} steps: {rate}, expected {expected}");
    }
    // MultiStepLR: the base rate times γ per milestone reached.
    let step = MetaLrSchedule::MultiStep { milestones: vec![2, 4], gamma: 0.5 };
    let rates: Vec<f64> = (0..6).map(|t| step.rate(0.1, t)).collect();
    assert_eq!(rates, [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]);
    assert_eq!(MetaLrSchedule::Constant.rate(0.1, 10_000), 0.1);
}

/// Adam under a schedule takes exactly the steps of Adam whose rate is
/// changed by hand between steps, and not those of the constant rate.
#[test]
fn adam_takes_the_scheduled_rate_from_the_step_after_a_milestone() {
    let mut r = rng(4);
    let params = vec![random_tensor(&mut r, &[3, 4], 1.0), random_tensor(&mut r, &[5], 1.0)];
    let grads: Vec<Vec<_>> = (0..3).map(|_| vec![random_tensor(&mut r, &[3, 4], 1.0), random_tensor(&mut r, &[5], 1.0)]).collect();
    let run = |adam: &mut MetaAdam<Cpu>, by_hand: bool| {
        let mut p = params.clone();
        for (t, g) in grads.iter().enumerate() {
            if by_hand && t == 1 {
                adam.lr = 1e-2 * 0.1;
            }
            p = adam.step(&p, g);
        }
        flatten(&p)
    };
    let scheduled = run(&mut MetaAdam::new(1e-2, 2).with_schedule(MetaLrSchedule::MultiStep { milestones: vec![1], gamma: 0.1 }), false);
    let by_hand = run(&mut MetaAdam::new(1e-2, 2), true);
    let constant = run(&mut MetaAdam::new(1e-2, 2), false);
    assert_eq!(scheduled, by_hand, "the decayed rate applies from the second step on");
    assert!(relative_error(&scheduled, &constant) > 1e-4, "the schedule changed nothing");
    let adam = MetaAdam::<Cpu>::new(1e-2, 2).with_schedule(MetaLrSchedule::Cosine { steps: 10, min_lr: 0.0 });
    assert_eq!(adam.rate(), 1e-2, "the first step takes the base rate");
}

#[test]
fn schedule_settings_that_cannot_work_name_the_key_and_the_fix() {
    let dir = temp("schedule-errors");
    let config = small_config(&dir, "");
    let load = |sets: &[&str]| Config::load(&config, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let e = format!("{:#}", load(&["train.meta_lr_schedule=\"cosine\"", "train.meta_lr_min=0.01"]).unwrap_err());
    assert!(e.contains("train.meta_lr_min") && e.contains("below meta_lr"), "{e}");
    let e = format!("{:#}", load(&["train.meta_lr_schedule=\"step\""]).unwrap_err());
    assert!(e.contains("train.meta_lr_milestones") && e.contains("[20000, 40000]"), "{e}");
    let e = format!("{:#}", load(&["train.meta_lr_schedule=\"step\"", "train.meta_lr_milestones=[40, 20]"]).unwrap_err());
    assert!(e.contains("increasing"), "{e}");
    let e = format!("{:#}", load(&["train.meta_lr_schedule=\"step\"", "train.meta_lr_milestones=[20]", "train.meta_lr_gamma=0"]).unwrap_err());
    assert!(e.contains("train.meta_lr_gamma") && e.contains("> 0"), "{e}");
    let e = format!("{:#}", load(&["train.meta_lr_schedule=\"linear\""]).unwrap_err());
    assert!(e.contains("train.meta_lr_schedule") && e.contains("cosine"), "{e}");
    let cosine = load(&["train.meta_lr_schedule=\"cosine\"", "train.meta_lr_min=0.0001"]).unwrap();
    assert_eq!(cosine.meta_lr_schedule(), MetaLrSchedule::Cosine { steps: 6, min_lr: 1e-4 }, "cosine anneals over train.meta_steps");
    let e = err(&metagrad(&["train", "--config", config.to_str().unwrap(), "--set", "train.meta_lr_schedule=\"step\""]));
    assert!(e.contains("train.meta_lr_milestones"), "{e}");
}

/// The rate comes from Adam's step count, which checkpoints hold: a run
/// stopped before its milestone and resumed ends bit-identical to one that
/// never stopped, and the log records each step's rate.
#[test]
fn a_resumed_run_continues_its_schedule_exactly() {
    let dir = temp("schedule-resume");
    let config = small_config(&dir, "");
    let c = config.to_str().unwrap();
    let schedule = ["--set", "train.meta_lr_schedule=\"step\"", "--set", "train.meta_lr_milestones=[4]", "--set", "train.meta_lr_gamma=0.25"];
    let args = |name: &'static str, steps: &'static str| -> Vec<&str> {
        let mut a = vec!["train", "--config", c, "--quiet", "--set", name, "--set", steps];
        a.extend(schedule);
        a
    };
    ok(&metagrad(&args("run.name=whole", "train.meta_steps=6")));
    ok(&metagrad(&args("run.name=halves", "train.meta_steps=3")));
    ok(&metagrad(&["train", "--resume", dir.join("checkpoints/halves").to_str().unwrap(), "--quiet", "--set", "train.meta_steps=6"]));
    let (whole, halves) = (dir.join("checkpoints/whole"), dir.join("checkpoints/halves"));
    for file in ["params.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(whole.join("step-0000006").join(file)).unwrap();
        let b = std::fs::read(halves.join("step-0000006").join(file)).unwrap();
        assert!(a == b, "{file} differs between the uninterrupted and the resumed run");
    }
    let rates = |run: &Path| -> Vec<f64> { read_metrics(&run.join("metrics.jsonl")).unwrap().into_iter().filter(|m| m.split == "train").map(|m| m.meta_lr.unwrap()).collect() };
    assert_eq!(rates(&whole), [0.003, 0.003, 0.003, 0.003, 0.003 * 0.25, 0.003 * 0.25]);
    assert_eq!(rates(&halves), rates(&whole));
    // Its curves add the rate to loss and accuracy.
    let png = dir.join("schedule.png");
    ok(&metagrad(&["plot", whole.to_str().unwrap(), "--out", png.to_str().unwrap()]));
    assert_eq!(image::image_dimensions(&png).unwrap(), (900, 3 * 330 + 40));
    // A constant rate is the papers' setting and leaves the log as it was.
    ok(&metagrad(&["train", "--config", c, "--quiet", "--set", "run.name=constant", "--set", "train.meta_steps=1"]));
    assert!(read_metrics(&dir.join("checkpoints/constant/metrics.jsonl")).unwrap().iter().all(|m| m.meta_lr.is_none()));
    ok(&metagrad(&["plot", dir.join("checkpoints/constant").to_str().unwrap(), "--out", png.to_str().unwrap()]));
    assert_eq!(image::image_dimensions(&png).unwrap(), (900, 2 * 330 + 40));
}
