//! Models meta-learned by metagrad.

pub mod conv4;
