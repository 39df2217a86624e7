//! Bring-your-own-data loaders: CIFAR-10 binary batches, image-folder trees and `.npy` arrays.
//!
//! Every loader returns a [`Dataset`] with images `[N,C,H,W]` float32 in [0,1] and labels `[N]`
//! int64, validates the whole input before returning, and reports a bad file by name with what
//! the format expected. The formats:
//!
//! * **CIFAR-10, binary version** ([`load_cifar10_bin`]): `data_batch_1.bin` … `data_batch_5.bin`
//!   (training split) and `test_batch.bin` (test split), as unpacked from
//!   <https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz>; the directory given may hold them
//!   directly or in its `cifar-10-batches-bin/` subfolder. Each file is a sequence of 3,073-byte
//!   records: one label byte (0–9), then 1,024 red, 1,024 green and 1,024 blue bytes, each plane
//!   a row-major 32×32 image. Output `[N,3,32,32]`.
//!
//! * **Image folder** ([`load_image_folder`]), torchvision's `ImageFolder` layout: one subfolder
//!   per class, classes sorted by name, label = position in that order; inside a class folder
//!   (searched recursively, files in sorted path order) every `.png`, `.jpg` or `.jpeg` file
//!   (any case) is an image and every other file is ignored, as are names starting with `.`.
//!   *Split rule:* when the directory has both a `train/` and a `test/` (or `val/`) subfolder,
//!   the training split is read from `train/` and the test split from `test/` (`val/` when there
//!   is no `test/`), and both must hold the same class folders; otherwise the directory itself
//!   is the class root and **both splits are the same images** (evaluate on held-out data only
//!   with the split layout). A directory with only one of `train/` and `test/`/`val/` is an error
//!   rather than a data set with a class called `train`. *Channel rule:* when every image is
//!   grayscale (8- or 16-bit, with or without alpha) the output has 1 channel, otherwise every
//!   image is converted to RGB and the output has 3; alpha is dropped. 16-bit images are scaled
//!   by 1/65535, 8-bit by 1/255. All images must have the same size (no resizing is done).
//!
//! * **NumPy `.npy` arrays** ([`load_npy_pair`], [`load_npy_dir`]): format versions 1.0, 2.0
//!   and 3.0, C order. Images: dtype `|u1` (0–255, scaled by 1/255), `<f4` or `<f8` (values must
//!   already lie in [0,1]); shape `[N,H,W]` (one channel), `[N,C,H,W]` or `[N,H,W,C]` with
//!   C ∈ {1,3}. *Layout rule:* a 4-d array is NCHW when its dimension 1 is 1 or 3, otherwise NHWC
//!   when its last dimension is 1 or 3 (so an ambiguous `[N,3,H,3]` is read as NCHW). Labels:
//!   dtype `|u1`, `<i4` or `<i8`, shape `[N]`, non-negative. Big-endian variants (`>f4`, …) are
//!   read too. [`load_npy_dir`] reads `DIR/train_images.npy` + `DIR/train_labels.npy` or
//!   `DIR/test_images.npy` + `DIR/test_labels.npy`.
//!
//! Folder and NPY data sets may have any number of classes (labels are int64); CIFAR-10 labels
//! are checked against its 10 classes.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::data::{check_labels, Dataset, Split};
use crate::error::{Error, Result};

/// Where to get the CIFAR-10 binary version.
pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";

/// The folder the CIFAR-10 binary tarball unpacks to.
pub const CIFAR10_SUBDIR: &str = "cifar-10-batches-bin";

/// Bytes of one CIFAR-10 record: 1 label + 3×32×32 pixels.
const CIFAR10_RECORD: usize = 1 + 3 * 32 * 32;

/// Standard per-channel mean of the CIFAR-10 training set (R, G, B).
pub const CIFAR10_MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];

/// Standard per-channel standard deviation of the CIFAR-10 training set (R, G, B).
pub const CIFAR10_STD: [f64; 3] = [0.2470, 0.2435, 0.2616];

// ---------------------------------------------------------------------------------------------
// CIFAR-10 binary
// ---------------------------------------------------------------------------------------------

/// The batch files of `split`.
fn cifar10_files(split: Split) -> Vec<String> {
    match split {
        Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        Split::Test => vec!["test_batch.bin".to_string()],
    }
}

const CIFAR10_EXPECTED: &str = "data_batch_1.bin … data_batch_5.bin (training split) and test_batch.bin (test split)";

/// Loads a split of the CIFAR-10 binary version from `dir` (or `dir/cifar-10-batches-bin`).
/// The data set is named `cifar10/train` or `cifar10/test`.
pub fn load_cifar10_bin(dir: &Path, split: Split) -> Result<Dataset> {
    if !dir.is_dir() {
        return Err(Error::DataMissing(format!(
            "CIFAR-10 directory {} does not exist; expected {CIFAR10_EXPECTED} in it or in its \
             {CIFAR10_SUBDIR}/ subfolder: download the binary version from {CIFAR10_URL} and \
             unpack it with `tar xzf cifar-10-binary.tar.gz`",
            dir.display()
        )));
    }
    let files = cifar10_files(split);
    let sub = dir.join(CIFAR10_SUBDIR);
    let root = if !dir.join(&files[0]).is_file() && sub.is_dir() { sub } else { dir.to_path_buf() };

    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for name in &files {
        let path = root.join(name);
        if !path.is_file() {
            return Err(Error::data(
                &path,
                format!(
                    "missing: expected {CIFAR10_EXPECTED} in this directory (the CIFAR-10 binary \
                     version, from {CIFAR10_URL})"
                ),
            ));
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        if bytes.is_empty() {
            return Err(Error::data(&path, "empty file: expected records of 3073 bytes (1 label + 3×32×32 pixels)"));
        }
        if bytes.len() % CIFAR10_RECORD != 0 {
            return Err(Error::data(
                &path,
                format!(
                    "wrong record length: {} bytes is not a multiple of 3073 (1 label + 3×32×32 pixels); \
                     is this the CIFAR-10 binary version (not the Python or CIFAR-100 one)?",
                    bytes.len()
                ),
            ));
        }
        let n = bytes.len() / CIFAR10_RECORD;
        let mut file_labels = Vec::with_capacity(n);
        pixels.reserve(n * (CIFAR10_RECORD - 1));
        for record in bytes.chunks_exact(CIFAR10_RECORD) {
            file_labels.push(record[0]);
            pixels.extend_from_slice(&record[1..]);
        }
        check_labels(&path, &file_labels)?;
        labels.extend_from_slice(&file_labels);
    }
    let n = labels.len() as i64;
    Ok(Dataset {
        name: format!("cifar10/{}", split.label()),
        images: Tensor::from_slice(&pixels).view([n, 3, 32, 32]).to_kind(Kind::Float) / 255.0,
        labels: Tensor::from_slice(&labels).to_kind(Kind::Int64),
    })
}

// ---------------------------------------------------------------------------------------------
// Image folder
// ---------------------------------------------------------------------------------------------

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn is_hidden(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// The entries of `dir`, sorted by path.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        out.push(entry.map_err(|e| Error::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

/// The class folders of `root` (non-hidden subfolders), sorted by name.
fn class_folders(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(sorted_entries(root)?
        .into_iter()
        .filter(|p| p.is_dir() && !is_hidden(p))
        .map(|p| (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), p))
        .collect())
}

/// Image files below `dir` (recursively), in sorted path order.
fn image_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for path in sorted_entries(dir)? {
        if is_hidden(&path) {
            continue;
        }
        if path.is_dir() {
            image_files(&path, out)?;
        } else if is_image_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The class root of `split` under `dir` (see the split rule in the module docs) and, in the
/// split layout, the class root of the other split.
fn folder_split_root(dir: &Path, split: Split) -> Result<(PathBuf, Option<PathBuf>)> {
    let train = dir.join("train");
    let test = ["test", "val"].iter().map(|s| dir.join(s)).find(|p| p.is_dir());
    match (train.is_dir(), test) {
        (true, Some(test)) => Ok(match split {
            Split::Train => (train, Some(test)),
            Split::Test => (test, Some(train)),
        }),
        (false, None) => Ok((dir.to_path_buf(), None)),
        (true, None) => Err(Error::data(
            dir,
            "has a train/ folder but no test/ or val/ folder: expected both (one class folder per \
             class under each) or the class folders directly in this directory",
        )),
        (false, Some(test)) => Err(Error::data(
            dir,
            format!(
                "has a {}/ folder but no train/ folder: expected both (one class folder per class \
                 under each) or the class folders directly in this directory",
                test.file_name().unwrap_or_default().to_string_lossy()
            ),
        )),
    }
}

/// Loads a split of an image-folder tree (torchvision `ImageFolder` layout, see the module
/// docs for the split and channel rules). Returns the data set, named `folder:<dir>/<split>`,
/// and the class names in label order.
pub fn load_image_folder(dir: &Path, split: Split) -> Result<(Dataset, Vec<String>)> {
    if !dir.is_dir() {
        return Err(Error::DataMissing(format!(
            "image folder {} does not exist; expected one subfolder per class holding .png/.jpg/.jpeg \
             images (optionally under train/ and test/ subfolders)",
            dir.display()
        )));
    }
    let (root, other) = folder_split_root(dir, split)?;
    let classes = class_folders(&root)?;
    if classes.is_empty() {
        return Err(Error::data(
            &root,
            "no class folders: expected one subfolder per class holding .png/.jpg/.jpeg images \
             (e.g. cat/001.png, dog/002.jpg)",
        ));
    }
    let names: Vec<String> = classes.iter().map(|(n, _)| n.clone()).collect();
    if let Some(other) = other {
        let other_names: Vec<String> = class_folders(&other)?.into_iter().map(|(n, _)| n).collect();
        if other_names != names {
            let only = |a: &[String], b: &[String]| {
                let v: Vec<&str> = a.iter().filter(|n| !b.contains(n)).map(String::as_str).collect();
                if v.is_empty() { "none".to_string() } else { v.join(", ") }
            };
            return Err(Error::data(
                &root,
                format!(
                    "class folders differ from those of {}: only here: {}; only there: {}; labels \
                     are positions in the sorted class list, so both splits need the same class folders",
                    other.display(),
                    only(&names, &other_names),
                    only(&other_names, &names)
                ),
            ));
        }
    }

    let mut files = Vec::new();
    let mut labels = Vec::new();
    for (label, (name, path)) in classes.iter().enumerate() {
        let before = files.len();
        image_files(path, &mut files)?;
        if files.len() == before {
            return Err(Error::data(
                path,
                format!("empty class folder `{name}`: expected .png/.jpg/.jpeg images in it"),
            ));
        }
        labels.resize(files.len(), label as i64);
    }

    let mut images = Vec::with_capacity(files.len());
    let mut first: Option<(u32, u32)> = None;
    for path in &files {
        let img = decode_image(path)?;
        let size = (img.width(), img.height());
        match first {
            None => first = Some(size),
            Some(want) if want != size => {
                return Err(Error::data(
                    path,
                    format!(
                        "image is {}x{} (width x height) but the first image {} is {}x{}: all images \
                         must have the same size (resize them beforehand)",
                        size.0,
                        size.1,
                        files[0].display(),
                        want.0,
                        want.1
                    ),
                ));
            }
            Some(_) => {}
        }
        images.push(img);
    }
    let (w, h) = first.expect("at least one image");
    let gray = images.iter().all(|img| {
        use image::ColorType::*;
        matches!(img.color(), L8 | L16 | La8 | La16)
    });
    let c: i64 = if gray { 1 } else { 3 };
    let mut pixels: Vec<f32> = Vec::with_capacity(images.len() * (c as usize) * (w as usize) * (h as usize));
    for img in images {
        if gray {
            pixels.extend_from_slice(img.to_luma32f().as_raw());
        } else {
            pixels.extend_from_slice(img.to_rgb32f().as_raw());
        }
    }
    let n = files.len() as i64;
    let images = Tensor::from_slice(&pixels)
        .view([n, h as i64, w as i64, c])
        .permute([0, 3, 1, 2])
        .contiguous();
    let set = Dataset {
        name: format!("folder:{}/{}", dir.display(), split.label()),
        images,
        labels: Tensor::from_slice(&labels),
    };
    Ok((set, names))
}

fn decode_image(path: &Path) -> Result<image::DynamicImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader
        .decode()
        .map_err(|e| Error::data(path, format!("unreadable image: cannot decode it as PNG or JPEG: {e}")))
}

// ---------------------------------------------------------------------------------------------
// NPY
// ---------------------------------------------------------------------------------------------

/// Element types the NPY loaders read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DType {
    U8,
    I32,
    I64,
    F32,
    F64,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }
}

/// A parsed `.npy` file: dtype, byte order, shape and the raw payload.
struct NpyArray {
    descr: String,
    dtype: DType,
    big_endian: bool,
    shape: Vec<usize>,
    payload: Vec<u8>,
}

impl NpyArray {
    fn shape_str(&self) -> String {
        shape_str(&self.shape)
    }
    fn count(&self) -> usize {
        self.shape.iter().product()
    }
    fn words<const K: usize>(&self) -> impl Iterator<Item = [u8; K]> + '_ {
        let big = self.big_endian;
        self.payload.chunks_exact(K).map(move |c| {
            let mut w: [u8; K] = c.try_into().expect("chunk of K bytes");
            if big {
                w.reverse();
            }
            w
        })
    }
    fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::U8 => self.payload.iter().map(|&b| b as f32).collect(),
            DType::F32 => self.words::<4>().map(f32::from_le_bytes).collect(),
            DType::F64 => self.words::<8>().map(|w| f64::from_le_bytes(w) as f32).collect(),
            DType::I32 => self.words::<4>().map(|w| i32::from_le_bytes(w) as f32).collect(),
            DType::I64 => self.words::<8>().map(|w| i64::from_le_bytes(w) as f32).collect(),
        }
    }
    fn to_i64(&self) -> Vec<i64> {
        match self.dtype {
            DType::U8 => self.payload.iter().map(|&b| b as i64).collect(),
            DType::I32 => self.words::<4>().map(|w| i32::from_le_bytes(w) as i64).collect(),
            DType::I64 => self.words::<8>().map(i64::from_le_bytes).collect(),
            DType::F32 | DType::F64 => unreachable!("labels are integers"),
        }
    }
}

fn shape_str(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    }
}

/// A value of the header dictionary.
#[derive(Debug)]
enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
    Other(String),
}

/// A minimal parser for the Python dict literal of an NPY header.
struct HeaderParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl HeaderParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        match self.peek() {
            Some(x) if x == c => {
                self.i += 1;
                Ok(())
            }
            Some(x) => Err(format!("expected `{}` at offset {}, found `{}`", c as char, self.i, x as char)),
            None => Err(format!("expected `{}` at offset {}, found the end", c as char, self.i)),
        }
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a quoted string at offset {}", self.i)),
        };
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != quote {
            self.i += 1;
        }
        if self.i >= self.s.len() {
            return Err("unterminated string".into());
        }
        let out = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        self.i += 1;
        Ok(out)
    }
    fn value(&mut self) -> std::result::Result<PyValue, String> {
        match self.peek() {
            Some(b'\'' | b'"') => self.string().map(PyValue::Str),
            Some(b'(') => {
                self.i += 1;
                let mut dims = Vec::new();
                loop {
                    match self.peek() {
                        Some(b')') => {
                            self.i += 1;
                            return Ok(PyValue::Tuple(dims));
                        }
                        Some(b',') if !dims.is_empty() => self.i += 1,
                        Some(c) if c.is_ascii_digit() => {
                            let start = self.i;
                            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                                self.i += 1;
                            }
                            let text = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                            dims.push(text.parse::<usize>().map_err(|_| format!("dimension {text} is too large"))?);
                            if self.s.get(self.i) == Some(&b'L') {
                                self.i += 1; // Python 2 long suffix
                            }
                        }
                        _ => return Err(format!("expected a tuple of non-negative integers at offset {}", self.i)),
                    }
                }
            }
            Some(b'[' | b'{') => {
                // Structured dtypes: skip the balanced bracket, keep the text for the message.
                let start = self.i;
                let mut depth = 0usize;
                while self.i < self.s.len() {
                    match self.s[self.i] {
                        b'[' | b'{' | b'(' => depth += 1,
                        b']' | b'}' | b')' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
                Ok(PyValue::Other(String::from_utf8_lossy(&self.s[start..self.i]).into_owned()))
            }
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_alphanumeric() {
                    self.i += 1;
                }
                match &self.s[start..self.i] {
                    b"True" => Ok(PyValue::Bool(true)),
                    b"False" => Ok(PyValue::Bool(false)),
                    other => Err(format!("unexpected value `{}` at offset {start}", String::from_utf8_lossy(other))),
                }
            }
            None => Err("unexpected end of header".into()),
        }
    }
    fn dict(&mut self) -> std::result::Result<Vec<(String, PyValue)>, String> {
        self.expect(b'{')?;
        let mut out = Vec::new();
        loop {
            if self.peek() == Some(b'}') {
                self.i += 1;
                return Ok(out);
            }
            let key = self.string()?;
            self.expect(b':')?;
            let value = self.value()?;
            out.push((key, value));
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {}
                _ => return Err(format!("expected `,` or `}}` at offset {}", self.i)),
            }
        }
    }
}

/// Reads and validates an `.npy` file whose dtype is one of `allowed` (`what` names the role of
/// the file, e.g. "images", and `supported` lists the accepted dtypes for the message).
fn read_npy(path: &Path, what: &str, allowed: &[DType], supported: &str) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        let head: String = bytes.iter().take(6).flat_map(|&b| std::ascii::escape_default(b)).map(char::from).collect();
        return Err(Error::data(
            path,
            format!("bad magic `{head}`: expected `\\x93NUMPY` (a .npy file written by numpy.save)"),
        ));
    }
    if bytes.len() < 10 {
        return Err(Error::data(path, format!("truncated: {} bytes, too short for an NPY header", bytes.len())));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len_bytes, start) = match major {
        1 => (2, 10),
        2 | 3 => (4, 12),
        _ => {
            return Err(Error::data(
                path,
                format!("unsupported NPY format version {major}.{minor}: expected 1.0, 2.0 or 3.0"),
            ))
        }
    };
    if bytes.len() < start {
        return Err(Error::data(path, format!("truncated: {} bytes, too short for an NPY header", bytes.len())));
    }
    let header_len = if len_bytes == 2 {
        u16::from_le_bytes([bytes[8], bytes[9]]) as usize
    } else {
        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
    };
    let Some(data_start) = start.checked_add(header_len).filter(|&e| e <= bytes.len()) else {
        return Err(Error::data(
            path,
            format!("truncated: the header claims {header_len} bytes, the file has {} after the preamble", bytes.len() - start),
        ));
    };
    let header = &bytes[start..data_start];
    let bad_header = |msg: String| {
        Error::data(path, format!("malformed NPY header `{}`: {msg}", String::from_utf8_lossy(header).trim()))
    };
    let dict = HeaderParser { s: header, i: 0 }.dict().map_err(bad_header)?;
    let get = |key: &str| dict.iter().find(|(k, _)| k == key).map(|(_, v)| v);

    let descr = match get("descr") {
        Some(PyValue::Str(s)) => s.clone(),
        Some(PyValue::Other(s)) => {
            return Err(Error::data(
                path,
                format!("unsupported dtype {s} (a structured array) for {what}: expected {supported}"),
            ))
        }
        _ => return Err(bad_header("no string value for `descr`".into())),
    };
    let fortran = match get("fortran_order") {
        Some(PyValue::Bool(b)) => *b,
        _ => return Err(bad_header("no True/False value for `fortran_order`".into())),
    };
    let shape = match get("shape") {
        Some(PyValue::Tuple(t)) => t.clone(),
        _ => return Err(bad_header("no tuple value for `shape`".into())),
    };

    let (order, code) = match descr.as_bytes().first() {
        Some(b'<' | b'>' | b'|' | b'=') => descr.split_at(1),
        _ => ("", descr.as_str()),
    };
    let dtype = match code {
        "u1" => Some(DType::U8),
        "i4" => Some(DType::I32),
        "i8" => Some(DType::I64),
        "f4" => Some(DType::F32),
        "f8" => Some(DType::F64),
        _ => None,
    }
    .filter(|d| allowed.contains(d))
    .filter(|d| *d == DType::U8 || order != "|");
    let Some(dtype) = dtype else {
        return Err(Error::data(path, format!("unsupported dtype `{descr}` for {what}: expected {supported}")));
    };
    let big_endian = order == ">" || (order == "=" && cfg!(target_endian = "big"));

    if fortran {
        return Err(Error::data(
            path,
            "fortran_order is True: expected a C-order array (save it with \
             numpy.save(path, numpy.ascontiguousarray(a)))",
        ));
    }
    let needed = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|c| c.checked_mul(dtype.size()))
        .filter(|&p| p <= i64::MAX as usize);
    let Some(needed) = needed else {
        return Err(Error::data(path, format!("shape {} overflows: not a valid array", shape_str(&shape))));
    };
    let have = bytes.len() - data_start;
    if have != needed {
        let problem = if have < needed { "truncated" } else { "trailing bytes" };
        return Err(Error::data(
            path,
            format!(
                "{problem}: shape {} of {descr} needs {needed} payload bytes, file has {have}",
                shape_str(&shape)
            ),
        ));
    }
    Ok(NpyArray { descr, dtype, big_endian, shape, payload: bytes[data_start..].to_vec() })
}

const IMAGE_DTYPES: &str = "|u1 (uint8, 0-255), <f4 (float32 in [0,1]) or <f8 (float64 in [0,1])";
const LABEL_DTYPES: &str = "|u1 (uint8), <i4 (int32) or <i8 (int64)";

/// Reads an image array (see the module docs for dtypes, shapes and the layout rule) as
/// `[N,C,H,W]` float32 in [0,1].
fn read_npy_images(path: &Path) -> Result<Tensor> {
    let arr = read_npy(path, "images", &[DType::U8, DType::F32, DType::F64], IMAGE_DTYPES)?;
    let s: Vec<i64> = arr.shape.iter().map(|&d| d as i64).collect();
    let expected = "expected [N,H,W], [N,C,H,W] or [N,H,W,C] with C = 1 or 3";
    let (nchw, nhwc) = match s.len() {
        3 => ([s[0], 1, s[1], s[2]], false),
        4 if s[1] == 1 || s[1] == 3 => ([s[0], s[1], s[2], s[3]], false),
        4 if s[3] == 1 || s[3] == 3 => ([s[0], s[3], s[1], s[2]], true),
        4 => {
            return Err(Error::data(
                path,
                format!("image shape {} has no channel axis of size 1 or 3: {expected}", arr.shape_str()),
            ))
        }
        r => return Err(Error::data(path, format!("image shape {} has {r} dimensions: {expected}", arr.shape_str()))),
    };
    if nchw[0] == 0 {
        return Err(Error::data(path, format!("no images: shape {}", arr.shape_str())));
    }
    if nchw[2] == 0 || nchw[3] == 0 {
        return Err(Error::data(path, format!("image shape {}: height and width must be positive", arr.shape_str())));
    }
    let values = arr.to_f32();
    if arr.dtype != DType::U8 {
        if let Some(i) = values.iter().position(|v| v.is_nan()) {
            return Err(Error::data(path, format!("{} images hold NaN at element {i}: expected values in [0,1]", arr.descr)));
        }
        let min = values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if min < 0.0 || max > 1.0 {
            return Err(Error::data(
                path,
                format!(
                    "{} pixel values span [{min}, {max}]: float images must lie in [0,1] (divide 0-255 \
                     data by 255, or save it as uint8)",
                    arr.descr
                ),
            ));
        }
    }
    let t = Tensor::from_slice(&values);
    let t = if arr.dtype == DType::U8 { t / 255.0 } else { t };
    Ok(if nhwc {
        t.view([nchw[0], nchw[2], nchw[3], nchw[1]]).permute([0, 3, 1, 2]).contiguous()
    } else {
        t.view(nchw)
    })
}

/// Reads a label array: `[N]`, integer dtype, non-negative.
fn read_npy_labels(path: &Path) -> Result<Vec<i64>> {
    let arr = read_npy(path, "labels", &[DType::U8, DType::I32, DType::I64], LABEL_DTYPES)?;
    if arr.shape.len() != 1 {
        return Err(Error::data(
            path,
            format!("label shape {}: expected [N], one class index per image", arr.shape_str()),
        ));
    }
    debug_assert_eq!(arr.count(), arr.shape[0]);
    let labels = arr.to_i64();
    if let Some(i) = labels.iter().position(|&l| l < 0) {
        return Err(Error::data(
            path,
            format!("label {} at index {i} is negative: expected class indices 0, 1, 2, …", labels[i]),
        ));
    }
    Ok(labels)
}

/// Loads an image `.npy` file and a label `.npy` file (see the module docs for the accepted
/// dtypes and shapes). The data set is named after the image file.
pub fn load_npy_pair(images: &Path, labels: &Path) -> Result<Dataset> {
    let x = read_npy_images(images)?;
    let y = read_npy_labels(labels)?;
    let n = x.size()[0];
    if y.len() as i64 != n {
        return Err(Error::data(
            labels,
            format!("holds {} labels but {} holds {n} images", y.len(), images.display()),
        ));
    }
    Ok(Dataset { name: images.display().to_string(), images: x, labels: Tensor::from_slice(&y) })
}

/// Loads `DIR/<split>_images.npy` and `DIR/<split>_labels.npy` (`<split>` = `train` or `test`).
/// The data set is named `npy:<dir>/<split>`.
pub fn load_npy_dir(dir: &Path, split: Split) -> Result<Dataset> {
    if !dir.is_dir() {
        return Err(Error::DataMissing(format!(
            "npy data directory {} does not exist; expected train_images.npy, train_labels.npy, \
             test_images.npy and test_labels.npy in it (written with numpy.save)",
            dir.display()
        )));
    }
    let s = split.label();
    let find = |name: String| {
        let path = dir.join(&name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::data(
                path,
                format!("missing: expected {s}_images.npy and {s}_labels.npy in this directory (written with numpy.save)"),
            ))
        }
    };
    let images = find(format!("{s}_images.npy"))?;
    let labels = find(format!("{s}_labels.npy"))?;
    let mut set = load_npy_pair(&images, &labels)?;
    set.name = format!("npy:{}/{s}", dir.display());
    Ok(set)
}

/// Per-channel mean and (population) standard deviation of `[N,C,H,W]` images, accumulated in
/// f64 over chunks so large sets need no extra copy. A channel with zero spread gets std 1.
pub fn channel_stats(images: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let size = images.size();
    let (n, c) = (size[0], size[1]);
    let per_channel = (n * size[2..].iter().product::<i64>()) as f64;
    let mut sum = vec![0f64; c as usize];
    let mut sq = vec![0f64; c as usize];
    let chunk = 1024;
    for start in (0..n).step_by(chunk as usize) {
        let x = images.narrow(0, start, chunk.min(n - start)).to_kind(Kind::Double);
        let s = Vec::<f64>::try_from(&x.sum_dim_intlist([0i64, 2, 3].as_slice(), false, Kind::Double)).unwrap_or_default();
        let q = Vec::<f64>::try_from(&x.square().sum_dim_intlist([0i64, 2, 3].as_slice(), false, Kind::Double))
            .unwrap_or_default();
        for k in 0..c as usize {
            sum[k] += s.get(k).copied().unwrap_or(0.0);
            sq[k] += q.get(k).copied().unwrap_or(0.0);
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / per_channel.max(1.0)).collect();
    let std = sq
        .iter()
        .zip(&mean)
        .map(|(q, m)| {
            let sd = (q / per_channel.max(1.0) - m * m).max(0.0).sqrt();
            if sd < 1e-6 {
                1.0
            } else {
                sd
            }
        })
        .collect();
    (mean, std)
}
