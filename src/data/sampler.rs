//! Few-shot datasets in memory, and the episode sampler.
//!
//! A split is a list of classes, each a block of same-shaped f32 images. An
//! episode draws N classes, K support and Q query images from each, and
//! permutes the labels 0..N−1 over the chosen classes. Sampling is seeded and
//! uses only a portable RNG (ChaCha8), so the same seed gives the same
//! episodes on any machine; `BackgroundSampler` produces them on a thread
//! into a bounded queue so training never waits for data.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::episode::{Episode, LabelledImages};

/// One class: `count` images of shape [C, H, W], stored contiguously as u8
/// (pixel value ×255), a quarter of the memory of f32: Mini-ImageNet's
/// training split is 0.8 GB this way.
#[derive(Clone, Debug)]
pub struct Class {
    pub name: String,
    pub pixels: Vec<u8>,
    pub count: usize,
}

/// The classes of one split, all with images of one shape.
#[derive(Clone, Debug)]
pub struct Split {
    pub name: String,
    pub image_shape: [usize; 3],
    pub classes: Vec<Class>,
}

impl Split {
    pub fn image_len(&self) -> usize {
        self.image_shape.iter().product()
    }

    pub fn image(&self, class: usize, index: usize) -> &[u8] {
        let n = self.image_len();
        &self.classes[class].pixels[index * n..(index + 1) * n]
    }

    pub fn image_count(&self) -> usize {
        self.classes.iter().map(|c| c.count).sum()
    }

    pub fn min_images_per_class(&self) -> usize {
        self.classes.iter().map(|c| c.count).min().unwrap_or(0)
    }

    /// Check that an N-way K-shot episode with Q queries per class can be drawn.
    pub fn check_request(&self, request: &EpisodeShape) -> Result<()> {
        let EpisodeShape { way, shot, queries } = *request;
        if way < 2 {
            bail!("way = {way}: a few-shot task needs at least 2 classes");
        }
        if shot == 0 || queries == 0 {
            bail!("shot = {shot}, queries = {queries}: each class needs at least 1 support and 1 query image");
        }
        if way > self.classes.len() {
            bail!(
                "{way}-way episodes need {way} classes but the {} split has {}; ask for {} classes or fewer (data.way in a config, --way on data and export commands)",
                self.name,
                self.classes.len(),
                self.classes.len()
            );
        }
        let least = self.min_images_per_class();
        if shot + queries > least {
            bail!(
                "{shot}-shot episodes with {queries} queries need {} images per class but some class of the {} split has only {least}; lower the shot or the queries (data.shot / data.queries in a config, --shot / --queries on data and export commands) so that shot + queries ≤ {least}",
                shot + queries,
                self.name
            );
        }
        Ok(())
    }
}

/// N-way, K-shot, Q queries per class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpisodeShape {
    pub way: usize,
    pub shot: usize,
    pub queries: usize,
}

/// Draws episodes from a split with its own seeded random stream.
pub struct EpisodeSampler {
    split: Arc<Split>,
    shape: EpisodeShape,
    rng: ChaCha8Rng,
}

impl EpisodeSampler {
    pub fn new(split: Arc<Split>, shape: EpisodeShape, seed: u64) -> Result<Self> {
        split.check_request(&shape)?;
        Ok(EpisodeSampler { split, shape, rng: ChaCha8Rng::seed_from_u64(seed) })
    }

    /// The RNG state, to checkpoint and restore the episode stream exactly.
    pub fn rng(&self) -> &ChaCha8Rng {
        &self.rng
    }

    pub fn set_rng(&mut self, rng: ChaCha8Rng) {
        self.rng = rng;
    }

    pub fn next_episode(&mut self) -> Episode {
        self.next_episode_with_classes().0
    }

    /// The next episode and the split's class index behind each label.
    pub fn next_episode_with_classes(&mut self) -> (Episode, Vec<usize>) {
        let EpisodeShape { way, shot, queries } = self.shape;
        let split = &self.split;
        // Which classes, and in which order: position i gets label i, so the
        // choice is also a random label permutation.
        let chosen: Vec<usize> = rand::seq::index::sample(&mut self.rng, split.classes.len(), way).into_vec();
        let [c, h, w] = split.image_shape;
        let n = c * h * w;
        let mut support = LabelledImages { images: Vec::with_capacity(way * shot * n), shape: [way * shot, c, h, w], labels: Vec::new() };
        let mut query = LabelledImages { images: Vec::with_capacity(way * queries * n), shape: [way * queries, c, h, w], labels: Vec::new() };
        for (label, &class) in chosen.iter().enumerate() {
            let picks = rand::seq::index::sample(&mut self.rng, split.classes[class].count, shot + queries).into_vec();
            for (k, &index) in picks.iter().enumerate() {
                let part = if k < shot { &mut support } else { &mut query };
                part.images.extend(split.image(class, index).iter().map(|&v| f32::from(v) / 255.0));
                part.labels.push(label);
            }
        }
        (Episode { way, support, query }, chosen)
    }
}

/// An `EpisodeSampler` running on its own thread, `capacity` episodes ahead.
pub struct BackgroundSampler {
    receiver: Receiver<(Episode, ChaCha8Rng)>,
    worker: Option<JoinHandle<()>>,
    rng_after_last: Option<ChaCha8Rng>,
}

impl BackgroundSampler {
    pub fn start(mut sampler: EpisodeSampler, capacity: usize) -> Self {
        let (sender, receiver): (SyncSender<(Episode, ChaCha8Rng)>, _) = sync_channel(capacity.max(1));
        let worker = std::thread::spawn(move || {
            loop {
                let episode = sampler.next_episode();
                // The RNG state after each episode travels with it, so a
                // checkpoint can resume the stream exactly where training is,
                // not where the sampler ran ahead to.
                if sender.send((episode, sampler.rng().clone())).is_err() {
                    break;
                }
            }
        });
        BackgroundSampler { receiver, worker: Some(worker), rng_after_last: None }
    }

    pub fn next_episode(&mut self) -> Episode {
        let (episode, rng) = self.receiver.recv().expect("the sampling thread runs until the sampler is dropped");
        self.rng_after_last = Some(rng);
        episode
    }

    /// The sampler's RNG state just after the last episode handed out.
    pub fn rng_after_last(&self) -> Option<&ChaCha8Rng> {
        self.rng_after_last.as_ref()
    }
}

impl Drop for BackgroundSampler {
    fn drop(&mut self) {
        // Closing the channel stops the worker at its next send.
        let (_, dead) = sync_channel(1);
        drop(std::mem::replace(&mut self.receiver, dead));
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

