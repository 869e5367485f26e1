//! Training: the trainer loop, evaluation, checkpoints, configuration, the
//! metrics log and training curves.

pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod metrics;
pub mod plot;
pub mod resume;
pub mod runs;
pub mod trainer;

pub use evaluate::{EpisodeScore, EvalJob, EvalOutcome, evaluate};
pub use metrics::{Metrics, StepTiming, Summary, read_metrics};
pub use resume::{RunRequest, default_config, prepare_run};
pub use trainer::{Outcome, TrainJob, Trainer};
