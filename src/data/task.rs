//! A few-shot task on the host: support and query examples, each a batch of
//! inputs with class labels (classification) or target values (regression).

use crate::autodiff::tensor::one_hot;

/// What a batch of examples is to be predicted as.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// One class in 0..classes per example: cross-entropy loss, accuracy.
    Classes { labels: Vec<usize>, classes: usize },
    /// `width` real values per example: mean squared error.
    Values { values: Vec<f32>, width: usize },
}

impl Targets {
    /// Output width a model needs for these targets.
    pub fn width(&self) -> usize {
        match self {
            Targets::Classes { classes, .. } => *classes,
            Targets::Values { width, .. } => *width,
        }
    }

    /// The class labels, for classification targets.
    pub fn labels(&self) -> Option<&[usize]> {
        match self {
            Targets::Classes { labels, .. } => Some(labels),
            Targets::Values { .. } => None,
        }
    }

    /// Row-major [n, width] targets as floats: one-hot rows for classes.
    pub fn to_rows(&self) -> Vec<f64> {
        match self {
            Targets::Classes { labels, classes } => one_hot(labels, *classes),
            Targets::Values { values, .. } => values.iter().map(|&v| f64::from(v)).collect(),
        }
    }
}

/// A batch of examples: inputs [n, ...] in f32, row-major, and their targets.
#[derive(Clone, Debug, PartialEq)]
pub struct Examples {
    pub inputs: Vec<f32>,
    /// [n, ...]: the number of examples, then one example's dimensions.
    pub dims: Vec<usize>,
    pub targets: Targets,
}

impl Examples {
    pub fn new(inputs: Vec<f32>, dims: Vec<usize>, targets: Targets) -> Self {
        let expected: usize = dims.iter().product();
        assert_eq!(inputs.len(), expected, "examples: {} input values for dims {dims:?}", inputs.len());
        let n = dims[0];
        let target_rows = match &targets {
            Targets::Classes { labels, .. } => labels.len(),
            Targets::Values { values, width } => values.len() / width.max(&1),
        };
        assert_eq!(target_rows, n, "examples: {n} inputs but {target_rows} targets");
        Examples { inputs, dims, targets }
    }

    /// Classified images [n, C, H, W] with labels in 0..classes.
    pub fn classified(inputs: Vec<f32>, dims: Vec<usize>, labels: Vec<usize>, classes: usize) -> Self {
        Examples::new(inputs, dims, Targets::Classes { labels, classes })
    }

    /// All examples of `parts` in one batch (their targets must be alike:
    /// the same classes, or values of the same width).
    pub fn concat(parts: &[&Examples]) -> Examples {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        let dims = [vec![n], parts[0].example_dims().to_vec()].concat();
        let inputs = parts.iter().flat_map(|p| p.inputs.iter().copied()).collect();
        let targets = match &parts[0].targets {
            Targets::Classes { classes, .. } => Targets::Classes { labels: parts.iter().flat_map(|p| p.targets.labels().expect("class targets throughout").to_vec()).collect(), classes: *classes },
            Targets::Values { width, .. } => Targets::Values {
                values: parts
                    .iter()
                    .flat_map(|p| match &p.targets {
                        Targets::Values { values, .. } => values.clone(),
                        Targets::Classes { .. } => panic!("concat: value and class targets mixed"),
                    })
                    .collect(),
                width: *width,
            },
        };
        Examples::new(inputs, dims, targets)
    }

    pub fn len(&self) -> usize {
        self.dims[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dimensions of one example.
    pub fn example_dims(&self) -> &[usize] {
        &self.dims[1..]
    }

    /// The examples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Examples {
        let inputs = indices.iter().flat_map(|&i| self.example(i).iter().copied()).collect();
        let dims = [vec![indices.len()], self.example_dims().to_vec()].concat();
        let targets = match &self.targets {
            Targets::Classes { labels, classes } => Targets::Classes { labels: indices.iter().map(|&i| labels[i]).collect(), classes: *classes },
            Targets::Values { values, width } => Targets::Values { values: indices.iter().flat_map(|&i| values[i * width..(i + 1) * width].iter().copied()).collect(), width: *width },
        };
        Examples::new(inputs, dims, targets)
    }

    /// Example i's input values.
    pub fn example(&self, i: usize) -> &[f32] {
        let size: usize = self.dims[1..].iter().product();
        &self.inputs[i * size..(i + 1) * size]
    }
}

/// One task: adapt on `support`, measure on `query`.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub support: Examples,
    pub query: Examples,
}
