//! Data: datasets in memory, the seeded episode sampler, dataset loaders
//! (Omniglot, Mini-ImageNet, the embedded synthetic sets, sinusoids), the
//! image cache, verified downloads and episodes on disk.

pub mod cache;
pub mod dataset;
pub mod episode;
pub mod fetch;
pub mod fixed_episodes;
pub mod mini_imagenet;
pub mod omniglot;
pub mod sampler;
pub mod sinusoid;
pub mod store;
pub mod synthetic;
pub mod task;

pub use sampler::{BackgroundSampler, Class, EpisodeSampler, EpisodeShape, Split};
pub use task::{Examples, Targets, Task};
