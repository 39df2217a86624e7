//! Integration tests of the validated data loaders in `dynrobust_core::data`.
//!
//! Every fixture is generated at test time in its own folder under the system temp dir
//! (`dynrobust-data-loaders-<pid>-<test name>`), so tests can run in parallel.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use dynrobust_core::data::{load_idx_dir, load_idx_pair, load_mnist_csv, read_idx, DataSource, Dataset, Split};
use dynrobust_core::Error;
use proptest::prelude::*;
use tch::{Kind, Tensor};

// ---------------------------------------------------------------------------------------------
// Fixture helpers
// ---------------------------------------------------------------------------------------------

/// A fresh, empty folder unique to this process and `name`; removed again on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dynrobust-data-loaders-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        TestDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The bytes of an unsigned-byte IDX file with the given magic, dims and payload.
fn idx_bytes_with_magic(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// The bytes of a well-formed unsigned-byte IDX file.
fn idx_bytes(dims: &[u32], payload: &[u8]) -> Vec<u8> {
    idx_bytes_with_magic(0x0800 | dims.len() as u32, dims, payload)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes `bytes` to `path`, gzipped when `gz`.
fn write_file(path: &Path, bytes: &[u8], gz: bool) {
    let data = if gz { gzip(bytes) } else { bytes.to_vec() };
    std::fs::write(path, data).expect("write fixture");
}

/// Writes an image IDX file (`n` images of `h`x`w`) and a label IDX file into `dir` under the
/// names of `prefix` (`t10k` / `train`), with `.gz` appended when `gz`. Returns both paths.
fn write_idx_pair(
    dir: &Path,
    prefix: &str,
    dims: (u32, u32, u32),
    pixels: &[u8],
    labels: &[u8],
    gz: bool,
) -> (PathBuf, PathBuf) {
    let ext = if gz { ".gz" } else { "" };
    let images = dir.join(format!("{prefix}-images-idx3-ubyte{ext}"));
    let label_file = dir.join(format!("{prefix}-labels-idx1-ubyte{ext}"));
    write_file(&images, &idx_bytes(&[dims.0, dims.1, dims.2], pixels), gz);
    write_file(&label_file, &idx_bytes(&[labels.len() as u32], labels), gz);
    (images, label_file)
}

/// Deterministic pseudo-random pixels covering 0 and 255.
fn sample_pixels(n: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..n).map(|i| ((i * 37 + i / 7) % 256) as u8).collect();
    if n >= 2 {
        p[0] = 0;
        p[1] = 255;
    }
    p
}

fn tensor_u8(t: &Tensor) -> Vec<u8> {
    let scaled = (t * 255.0).round();
    Vec::<u8>::try_from(&scaled.to_kind(Kind::Uint8).flatten(0, -1)).unwrap()
}

fn tensor_f32(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

fn tensor_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t).unwrap()
}

/// Asserts that `set` holds exactly `pixels` (as [n,1,h,w] floats pixel/255) and `labels`.
fn assert_dataset(set: &Dataset, n: i64, h: i64, w: i64, pixels: &[u8], labels: &[u8]) {
    assert_eq!(set.images.size(), vec![n, 1, h, w], "image shape");
    assert_eq!(set.images.kind(), Kind::Float, "image kind");
    assert_eq!(set.labels.size(), vec![n], "label shape");
    assert_eq!(set.labels.kind(), Kind::Int64, "label kind");
    assert_eq!(set.len(), n);
    let floats = tensor_f32(&set.images);
    assert_eq!(floats.len(), pixels.len());
    for (i, (&f, &p)) in floats.iter().zip(pixels).enumerate() {
        assert!((0.0..=1.0).contains(&f), "pixel {i} = {f} outside [0,1]");
        let want = p as f32 / 255.0;
        assert!((f - want).abs() < 1e-6, "pixel {i}: got {f}, want {want} (= {p}/255)");
    }
    assert_eq!(tensor_u8(&set.images), pixels, "pixels round-trip");
    let want_labels: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    assert_eq!(tensor_i64(&set.labels), want_labels, "labels");
}

/// The `Error::Data` message (path and problem, as displayed), panicking on any other outcome.
fn data_error(result: dynrobust_core::Result<impl std::fmt::Debug>, expected_path: &Path) -> String {
    match result {
        Err(e @ Error::Data { .. }) => {
            if let Error::Data { path, .. } = &e {
                assert_eq!(path, expected_path, "error names the wrong file: {e}");
            }
            let msg = e.to_string();
            assert!(
                msg.contains(&expected_path.display().to_string()),
                "message `{msg}` does not name {}",
                expected_path.display()
            );
            msg
        }
        other => panic!("expected Error::Data on {}, got {other:?}", expected_path.display()),
    }
}

fn data_missing(result: dynrobust_core::Result<impl std::fmt::Debug>) -> String {
    match result {
        Err(e @ Error::DataMissing(_)) => e.to_string(),
        other => panic!("expected Error::DataMissing, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Good IDX pairs, plain and gzipped
// ---------------------------------------------------------------------------------------------

const GOOD_LABELS: [u8; 5] = [0, 9, 3, 3, 7];

fn check_good_idx(gz: bool) {
    let dir = TestDir::new(if gz { "good-idx-gz" } else { "good-idx-plain" });
    let pixels = sample_pixels(5 * 28 * 28);
    let (img, lab) = write_idx_pair(dir.path(), "t10k", (5, 28, 28), &pixels, &GOOD_LABELS, gz);
    if gz {
        let raw = std::fs::read(&img).unwrap();
        assert_eq!(&raw[..2], &[0x1f, 0x8b], "fixture really is gzipped");
    }

    let set = load_idx_pair(&img, &lab).expect("load_idx_pair on a good pair");
    assert_dataset(&set, 5, 28, 28, &pixels, &GOOD_LABELS);

    let set = load_idx_dir(dir.path(), Split::Test).expect("load_idx_dir on a good dir");
    assert_dataset(&set, 5, 28, 28, &pixels, &GOOD_LABELS);

    let set = DataSource::FashionMnist.load(Split::Test, Some(dir.path())).expect("DataSource::load on a good dir");
    assert_eq!(set.name, "fashion-mnist/test");
    assert_dataset(&set, 5, 28, 28, &pixels, &GOOD_LABELS);

    // The test split must not be confused with the training split.
    let msg = data_error(load_idx_dir(dir.path(), Split::Train), &dir.join("train-images-idx3-ubyte"));
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn good_idx_pair_plain_loads() {
    check_good_idx(false);
}

#[test]
fn good_idx_pair_gzipped_loads() {
    check_good_idx(true);
}

#[test]
fn idx_mixed_plain_images_and_gzipped_labels_load() {
    let dir = TestDir::new("mixed-gz");
    let pixels = sample_pixels(5 * 28 * 28);
    write_file(&dir.join("t10k-images-idx3-ubyte"), &idx_bytes(&[5, 28, 28], &pixels), false);
    write_file(&dir.join("t10k-labels-idx1-ubyte.gz"), &idx_bytes(&[5], &GOOD_LABELS), true);
    let set = load_idx_dir(dir.path(), Split::Test).expect("mixed plain/gz dir");
    assert_dataset(&set, 5, 28, 28, &pixels, &GOOD_LABELS);
}

#[test]
fn idx_non_square_images_keep_their_shape() {
    let dir = TestDir::new("non-square");
    let pixels = sample_pixels(3 * 4 * 6);
    let labels = [1, 2, 3];
    let (img, lab) = write_idx_pair(dir.path(), "t10k", (3, 4, 6), &pixels, &labels, false);
    let set = load_idx_pair(&img, &lab).unwrap();
    assert_dataset(&set, 3, 4, 6, &pixels, &labels);
}

// ---------------------------------------------------------------------------------------------
// 2. Wrong magic number
// ---------------------------------------------------------------------------------------------

#[test]
fn idx_wrong_magic_names_file_and_magic() {
    for gz in [false, true] {
        let dir = TestDir::new("wrong-magic");
        let pixels = sample_pixels(2 * 28 * 28);
        let (img, lab) = write_idx_pair(dir.path(), "t10k", (2, 28, 28), &pixels, &[1, 2], gz);

        // Images with the label magic (0x801).
        write_file(&img, &idx_bytes_with_magic(0x0801, &[2, 28, 28], &pixels), gz);
        let msg = data_error(load_idx_pair(&img, &lab), &img);
        assert!(msg.contains("magic"), "{msg}");
        assert!(msg.contains("0x00000801") && msg.contains("0x00000803"), "{msg}");

        // Via the directory loader too.
        let msg = data_error(load_idx_dir(dir.path(), Split::Test), &img);
        assert!(msg.contains("magic"), "{msg}");

        // Labels with a float-typed magic (0x0d01).
        write_file(&img, &idx_bytes(&[2, 28, 28], &pixels), gz);
        write_file(&lab, &idx_bytes_with_magic(0x0d01, &[2], &[1, 2]), gz);
        let msg = data_error(load_idx_pair(&img, &lab), &lab);
        assert!(msg.contains("magic"), "{msg}");

        // Files swapped: images given as labels.
        write_file(&lab, &idx_bytes(&[2], &[1, 2]), gz);
        let msg = data_error(load_idx_pair(&lab, &img), &lab);
        assert!(msg.contains("magic"), "{msg}");

        // Some random non-IDX file.
        write_file(&img, b"this is not an IDX file at all", gz);
        let msg = data_error(load_idx_pair(&img, &lab), &img);
        assert!(msg.contains("magic"), "{msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Truncated files
// ---------------------------------------------------------------------------------------------

#[test]
fn idx_truncated_payload_is_reported() {
    for gz in [false, true] {
        let dir = TestDir::new("truncated-payload");
        let pixels = sample_pixels(5 * 28 * 28);
        let (img, lab) = write_idx_pair(dir.path(), "t10k", (5, 28, 28), &pixels, &GOOD_LABELS, gz);
        // Drop the last 100 bytes of the payload.
        write_file(&img, &idx_bytes(&[5, 28, 28], &pixels[..pixels.len() - 100]), gz);
        let msg = data_error(load_idx_pair(&img, &lab), &img);
        assert!(msg.contains("truncated"), "{msg}");
        assert!(msg.contains(&format!("{}", 5 * 28 * 28)), "message gives the needed size: {msg}");

        // Truncated labels.
        write_file(&img, &idx_bytes(&[5, 28, 28], &pixels), gz);
        write_file(&lab, &idx_bytes(&[5], &GOOD_LABELS[..3]), gz);
        let msg = data_error(load_idx_pair(&img, &lab), &lab);
        assert!(msg.contains("truncated"), "{msg}");
    }
}

#[test]
fn idx_file_shorter_than_header_is_reported() {
    let dir = TestDir::new("truncated-header");
    let lab = dir.join("labels");
    write_file(&lab, &idx_bytes(&[1], &[1]), false);
    let img = dir.join("images");

    // Shorter than the magic number itself.
    for bytes in [&[][..], &[0x00][..], &[0x00, 0x00, 0x08][..]] {
        write_file(&img, bytes, false);
        let msg = data_error(load_idx_pair(&img, &lab), &img);
        assert!(msg.contains("truncated"), "{} bytes: {msg}", bytes.len());
    }

    // Correct magic but the dims are cut off (header needs 16 bytes).
    let full = idx_bytes(&[1, 28, 28], &[]);
    for cut in [4usize, 8, 12, 15] {
        write_file(&img, &full[..cut], false);
        let msg = data_error(load_idx_pair(&img, &lab), &img);
        assert!(msg.contains("truncated"), "{cut} bytes: {msg}");
        assert!(msg.contains("16"), "mentions the header size: {msg}");
        // Same, gzipped.
        write_file(&img, &full[..cut], true);
        let msg = data_error(load_idx_pair(&img, &lab), &img);
        assert!(msg.contains("truncated"), "{cut} bytes gz: {msg}");
    }

    // Via read_idx directly on a short label file.
    write_file(&lab, &[0x00, 0x00, 0x08, 0x01, 0x00], false);
    let msg = data_error(read_idx(&lab, 1), &lab);
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn idx_trailing_bytes_are_reported() {
    let dir = TestDir::new("trailing");
    let pixels = sample_pixels(2 * 28 * 28 + 3);
    let img = dir.join("t10k-images-idx3-ubyte");
    let lab = dir.join("t10k-labels-idx1-ubyte");
    write_file(&img, &idx_bytes(&[2, 28, 28], &pixels), false);
    write_file(&lab, &idx_bytes(&[2], &[0, 1]), false);
    let msg = data_error(load_idx_pair(&img, &lab), &img);
    assert!(msg.contains("trailing"), "{msg}");
}

#[test]
fn idx_corrupt_gzip_stream_is_reported() {
    let dir = TestDir::new("corrupt-gz");
    let pixels = sample_pixels(5 * 28 * 28);
    let (img, lab) = write_idx_pair(dir.path(), "t10k", (5, 28, 28), &pixels, &GOOD_LABELS, true);
    let gz = std::fs::read(&img).unwrap();
    // Cut the gzip stream in half.
    std::fs::write(&img, &gz[..gz.len() / 2]).unwrap();
    let msg = data_error(load_idx_pair(&img, &lab), &img);
    assert!(msg.contains("gzip") || msg.contains("truncated"), "{msg}");
}

#[test]
fn idx_zero_image_dims_are_rejected() {
    let dir = TestDir::new("zero-dims");
    let img = dir.join("images");
    let lab = dir.join("labels");
    write_file(&img, &idx_bytes(&[2, 0, 28], &[]), false);
    write_file(&lab, &idx_bytes(&[2], &[0, 1]), false);
    let msg = data_error(load_idx_pair(&img, &lab), &img);
    assert!(msg.contains("positive"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// 4. Labels out of range
// ---------------------------------------------------------------------------------------------

#[test]
fn idx_label_out_of_range_names_label_file() {
    for gz in [false, true] {
        let dir = TestDir::new("label-range");
        let pixels = sample_pixels(5 * 28 * 28);
        let labels = [0, 9, 12, 3, 255];
        let (img, lab) = write_idx_pair(dir.path(), "t10k", (5, 28, 28), &pixels, &labels, gz);
        let msg = data_error(load_idx_pair(&img, &lab), &lab);
        assert!(msg.contains("out of range"), "{msg}");
        assert!(msg.contains("12"), "names the bad label: {msg}");
        assert!(msg.contains("record 2"), "names the first bad record: {msg}");

        let msg = data_error(load_idx_dir(dir.path(), Split::Test), &lab);
        assert!(msg.contains("out of range"), "{msg}");

        // 10 is the first invalid label.
        let (img, lab) = write_idx_pair(dir.path(), "t10k", (5, 28, 28), &pixels, &[10, 0, 0, 0, 0], gz);
        let msg = data_error(load_idx_pair(&img, &lab), &lab);
        assert!(msg.contains("out of range") && msg.contains("record 0"), "{msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Image/label count mismatch
// ---------------------------------------------------------------------------------------------

#[test]
fn idx_count_mismatch_names_label_file() {
    for gz in [false, true] {
        let dir = TestDir::new("count-mismatch");
        let pixels = sample_pixels(5 * 28 * 28);
        let (img, lab) = write_idx_pair(dir.path(), "t10k", (5, 28, 28), &pixels, &[1, 2, 3, 4], gz);
        let msg = data_error(load_idx_pair(&img, &lab), &lab);
        assert!(msg.contains("4 labels"), "{msg}");
        assert!(msg.contains("5 images"), "{msg}");
        assert!(msg.contains(&img.display().to_string()), "also names the image file: {msg}");

        let msg = data_error(load_idx_dir(dir.path(), Split::Test), &lab);
        assert!(msg.contains("labels"), "{msg}");

        // More labels than images.
        let (img, lab) = write_idx_pair(dir.path(), "t10k", (5, 28, 28), &pixels, &[1, 2, 3, 4, 5, 6], gz);
        let msg = data_error(load_idx_pair(&img, &lab), &lab);
        assert!(msg.contains("6 labels") && msg.contains("5 images"), "{msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. and 7. Missing data
// ---------------------------------------------------------------------------------------------

fn nonexistent_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dynrobust-data-loaders-{}-{name}-does-not-exist", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!dir.exists());
    dir
}

#[test]
fn idx_missing_directory_says_how_to_install() {
    let dir = nonexistent_dir("missing-dir");
    let msg = data_missing(load_idx_dir(&dir, Split::Test));
    assert!(msg.contains(&dir.display().to_string()), "names the directory: {msg}");
    assert!(msg.contains("make data"), "{msg}");
    assert!(msg.contains("dataset-fashion-mnist"), "{msg}");
    let msg = data_missing(load_idx_dir(&dir, Split::Train));
    assert!(msg.contains("make data") && msg.contains("dataset-fashion-mnist"), "{msg}");
}

#[test]
fn idx_directory_without_files_names_missing_file() {
    let dir = TestDir::new("empty-dir");
    let msg = data_error(load_idx_dir(dir.path(), Split::Test), &dir.join("t10k-images-idx3-ubyte"));
    assert!(msg.contains("missing"), "{msg}");
    assert!(msg.contains("t10k-images-idx3-ubyte.gz"), "mentions the gz alternative: {msg}");

    // Images present, labels absent.
    write_file(&dir.join("t10k-images-idx3-ubyte.gz"), &idx_bytes(&[1, 28, 28], &[0; 784]), true);
    let msg = data_error(load_idx_dir(dir.path(), Split::Test), &dir.join("t10k-labels-idx1-ubyte"));
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn idx_pair_missing_file_is_io_error_naming_it() {
    let dir = TestDir::new("missing-file");
    let img = dir.join("nope-images");
    let lab = dir.join("nope-labels");
    match load_idx_pair(&img, &lab) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains(&img.display().to_string()), "{e}"),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn data_source_load_nonexistent_dir_is_clear() {
    let dir = nonexistent_dir("source-missing");
    let msg = data_missing(DataSource::FashionMnist.load(Split::Test, Some(&dir)));
    assert!(msg.contains(&dir.display().to_string()), "names the directory: {msg}");
    assert!(msg.contains("make data"), "{msg}");
    assert!(msg.contains("dataset-fashion-mnist"), "{msg}");

    // MNIST from a missing directory: the CSV file is missing.
    let msg = data_missing(DataSource::Mnist.load(Split::Test, Some(&dir)));
    assert!(msg.contains("mnist_test.csv"), "{msg}");
    assert!(msg.contains("make data-mnist"), "{msg}");
}

#[test]
fn data_source_parse_and_names() {
    assert_eq!(DataSource::parse("fashion-mnist").unwrap(), DataSource::FashionMnist);
    assert_eq!(DataSource::parse("fmnist").unwrap(), DataSource::FashionMnist);
    assert_eq!(DataSource::parse("mnist").unwrap(), DataSource::Mnist);
    let err = DataSource::parse("cifar10").unwrap_err().to_string();
    assert!(err.contains("cifar10") && err.contains("fashion-mnist"), "{err}");
    assert_eq!(DataSource::FashionMnist.name(), "fashion-mnist");
    assert_eq!(DataSource::Mnist.name(), "mnist");
}

// ---------------------------------------------------------------------------------------------
// 8. MNIST CSV
// ---------------------------------------------------------------------------------------------

fn csv_header() -> String {
    let mut h = String::from("label");
    for r in 1..=28 {
        for c in 1..=28 {
            h.push_str(&format!(",{r}x{c}"));
        }
    }
    h
}

fn csv_row(label: &str, pixels: &[u8]) -> String {
    let mut row = label.to_string();
    for p in pixels {
        row.push(',');
        row.push_str(&p.to_string());
    }
    row
}

/// Writes `mnist_test.csv` with the header and the given rows; returns its path.
fn write_csv(dir: &Path, rows: &[String]) -> PathBuf {
    let path = dir.join("mnist_test.csv");
    let mut text = csv_header();
    text.push('\n');
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

const CSV_LABELS: [u8; 3] = [7, 0, 9];

fn csv_good_rows() -> (Vec<String>, Vec<u8>) {
    let pixels = sample_pixels(3 * 784);
    let rows = (0..3).map(|i| csv_row(&CSV_LABELS[i].to_string(), &pixels[i * 784..(i + 1) * 784])).collect();
    (rows, pixels)
}

#[test]
fn mnist_csv_good_file_loads() {
    let dir = TestDir::new("csv-good");
    let (rows, pixels) = csv_good_rows();
    let path = write_csv(dir.path(), &rows);
    assert_eq!(csv_header().split(',').count(), 785);
    assert!(csv_header().ends_with(",28x28"));

    let set = load_mnist_csv(&path).expect("good CSV");
    assert_dataset(&set, 3, 28, 28, &pixels, &CSV_LABELS);

    let set = DataSource::Mnist.load(Split::Test, Some(dir.path())).expect("DataSource::Mnist.load");
    assert_eq!(set.name, "mnist/test");
    assert_dataset(&set, 3, 28, 28, &pixels, &CSV_LABELS);
}

#[test]
fn mnist_csv_tolerates_crlf_spaces_and_blank_lines() {
    let dir = TestDir::new("csv-crlf");
    let (rows, pixels) = csv_good_rows();
    let path = dir.join("mnist_test.csv");
    let mut text = csv_header() + "\r\n";
    for r in &rows {
        text.push_str(&r.replace(',', ", "));
        text.push_str("\r\n\r\n");
    }
    std::fs::write(&path, text).unwrap();
    let set = load_mnist_csv(&path).expect("CRLF CSV");
    assert_dataset(&set, 3, 28, 28, &pixels, &CSV_LABELS);
}

#[test]
fn mnist_csv_short_row_names_line() {
    let dir = TestDir::new("csv-short-row");
    let (mut rows, pixels) = csv_good_rows();
    // Third data row = line 4 of the file (line 1 is the header).
    rows[2] = csv_row("9", &pixels[2 * 784..3 * 784 - 1]);
    let path = write_csv(dir.path(), &rows);
    let msg = data_error(load_mnist_csv(&path), &path);
    assert!(msg.contains("line 4"), "{msg}");
    assert!(msg.contains("783"), "{msg}");
    assert!(msg.contains("784"), "{msg}");

    // A long row as well.
    let mut long = pixels[..784].to_vec();
    long.push(1);
    rows[2] = csv_row("9", &long);
    let path = write_csv(dir.path(), &rows);
    let msg = data_error(load_mnist_csv(&path), &path);
    assert!(msg.contains("line 4") && msg.contains("785"), "{msg}");
}

#[test]
fn mnist_csv_line_numbers_count_blank_lines() {
    let dir = TestDir::new("csv-blank-lines");
    let (rows, pixels) = csv_good_rows();
    let path = dir.join("mnist_test.csv");
    // header, row, blank, blank, bad row -> the bad row is line 5.
    let bad = csv_row("1", &pixels[..700]);
    let text = format!("{}\n{}\n\n\n{}\n", csv_header(), rows[0], bad);
    std::fs::write(&path, text).unwrap();
    let msg = data_error(load_mnist_csv(&path), &path);
    assert!(msg.contains("line 5"), "{msg}");
}

#[test]
fn mnist_csv_non_numeric_pixel_is_reported() {
    let dir = TestDir::new("csv-non-numeric");
    let (mut rows, _) = csv_good_rows();
    let mut fields: Vec<String> = rows[1].split(',').map(str::to_string).collect();
    fields[100] = "abc".into();
    rows[1] = fields.join(",");
    let path = write_csv(dir.path(), &rows);
    let msg = data_error(load_mnist_csv(&path), &path);
    assert!(msg.contains("line 3"), "{msg}");
    assert!(msg.contains("abc"), "{msg}");
    assert!(msg.contains("pixel"), "{msg}");

    // A pixel value above 255.
    let (mut rows, _) = csv_good_rows();
    let mut fields: Vec<String> = rows[0].split(',').map(str::to_string).collect();
    fields[5] = "256".into();
    rows[0] = fields.join(",");
    let path = write_csv(dir.path(), &rows);
    let msg = data_error(load_mnist_csv(&path), &path);
    assert!(msg.contains("line 2") && msg.contains("256"), "{msg}");

    // A non-numeric label.
    let (mut rows, pixels) = csv_good_rows();
    rows[0] = csv_row("seven", &pixels[..784]);
    let path = write_csv(dir.path(), &rows);
    let msg = data_error(load_mnist_csv(&path), &path);
    assert!(msg.contains("line 2") && msg.contains("seven"), "{msg}");
}

#[test]
fn mnist_csv_label_out_of_range() {
    let dir = TestDir::new("csv-label-range");
    let (mut rows, pixels) = csv_good_rows();
    rows[1] = csv_row("10", &pixels[784..2 * 784]);
    let path = write_csv(dir.path(), &rows);
    let msg = data_error(load_mnist_csv(&path), &path);
    assert!(msg.contains("out of range"), "{msg}");
    assert!(msg.contains("label 10"), "{msg}");
}

#[test]
fn mnist_csv_bad_header_and_empty_file() {
    let dir = TestDir::new("csv-header");
    let (rows, _) = csv_good_rows();
    let path = dir.join("mnist_test.csv");
    // No header: the first line is a data row.
    std::fs::write(&path, rows.join("\n")).unwrap();
    let msg = data_error(load_mnist_csv(&path), &path);
    assert!(msg.contains("line 1") && msg.contains("header"), "{msg}");

    // Empty file.
    std::fs::write(&path, "").unwrap();
    let msg = data_error(load_mnist_csv(&path), &path);
    assert!(msg.contains("header"), "{msg}");

    // Header only.
    std::fs::write(&path, csv_header() + "\n").unwrap();
    let msg = data_error(load_mnist_csv(&path), &path);
    assert!(msg.contains("no data rows"), "{msg}");
}

#[test]
fn mnist_csv_missing_file_says_make_data_mnist() {
    let dir = TestDir::new("csv-missing");
    let path = dir.join("mnist_test.csv");
    let msg = data_missing(load_mnist_csv(&path));
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("make data-mnist"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// 9. Property test: IDX round trip
// ---------------------------------------------------------------------------------------------

fn idx_case() -> impl Strategy<Value = (usize, usize, usize, Vec<u8>, Vec<u8>, bool, bool)> {
    (1usize..8, 1usize..6, 1usize..6, any::<bool>(), any::<bool>()).prop_flat_map(|(n, h, w, gz_img, gz_lab)| {
        (
            Just(n),
            Just(h),
            Just(w),
            proptest::collection::vec(any::<u8>(), n * h * w),
            proptest::collection::vec(0u8..10, n),
            Just(gz_img),
            Just(gz_lab),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Random 28x28 images, labels 0..9, random gzip: the loader returns exactly what was written.
    #[test]
    fn prop_idx_round_trip_28x28(
        (n, pixels, labels, gz) in (1usize..8).prop_flat_map(|n| (
            Just(n),
            proptest::collection::vec(any::<u8>(), n * 28 * 28),
            proptest::collection::vec(0u8..10, n),
            any::<bool>(),
        ))
    ) {
        let dir = TestDir::new("prop-28");
        let (img, lab) = write_idx_pair(dir.path(), "t10k", (n as u32, 28, 28), &pixels, &labels, gz);
        let set = load_idx_pair(&img, &lab).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(set.images.size(), vec![n as i64, 1, 28, 28]);
        prop_assert_eq!(tensor_u8(&set.images), pixels.clone());
        let want: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        prop_assert_eq!(tensor_i64(&set.labels), want.clone());

        let set = load_idx_dir(dir.path(), Split::Test).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(tensor_u8(&set.images), pixels);
        prop_assert_eq!(tensor_i64(&set.labels), want);
    }

    /// Random small shapes and independent gzip choice for the two files.
    #[test]
    fn prop_idx_round_trip_any_shape((n, h, w, pixels, labels, gz_img, gz_lab) in idx_case()) {
        let dir = TestDir::new("prop-any");
        let img = dir.join(if gz_img { "images.gz" } else { "images" });
        let lab = dir.join(if gz_lab { "labels.gz" } else { "labels" });
        write_file(&img, &idx_bytes(&[n as u32, h as u32, w as u32], &pixels), gz_img);
        write_file(&lab, &idx_bytes(&[n as u32], &labels), gz_lab);
        let set = load_idx_pair(&img, &lab).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(set.images.size(), vec![n as i64, 1, h as i64, w as i64]);
        prop_assert_eq!(tensor_u8(&set.images), pixels);
        let want: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        prop_assert_eq!(tensor_i64(&set.labels), want);
    }

    /// Any strict prefix of a valid IDX image file is rejected with an error naming the file
    /// (never a panic, never a silently shorter data set).
    #[test]
    fn prop_idx_any_prefix_is_rejected(n in 1usize..4, cut_frac in 0.0f64..1.0, gz in any::<bool>()) {
        let dir = TestDir::new("prop-prefix");
        let pixels = sample_pixels(n * 28 * 28);
        let full = idx_bytes(&[n as u32, 28, 28], &pixels);
        let cut = ((full.len() as f64) * cut_frac) as usize;
        prop_assume!(cut < full.len());
        let img = dir.join("images");
        let lab = dir.join("labels");
        write_file(&img, &full[..cut], gz);
        write_file(&lab, &idx_bytes(&[n as u32], &vec![1u8; n]), false);
        match load_idx_pair(&img, &lab) {
            Err(Error::Data { path, problem }) => {
                prop_assert_eq!(path, img);
                prop_assert!(problem.contains("truncated"), "{}", problem);
            }
            other => prop_assert!(false, "expected Error::Data, got {:?}", other),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 10. The real Fashion-MNIST test split, when installed
// ---------------------------------------------------------------------------------------------

#[test]
fn real_fashion_mnist_test_split_if_present() {
    let set = match DataSource::FashionMnist.load(Split::Test, None) {
        Ok(set) => set,
        Err(Error::DataMissing(msg)) => {
            println!("Fashion-MNIST not installed, skipping the real-data check: {msg}");
            return;
        }
        Err(e) => panic!("Fashion-MNIST is present but does not load: {e}"),
    };
    assert_eq!(set.name, "fashion-mnist/test");
    assert_eq!(set.len(), 10_000);
    assert_eq!(set.images.size(), vec![10_000, 1, 28, 28]);
    assert_eq!(set.images.kind(), Kind::Float);
    assert_eq!(set.labels.size(), vec![10_000]);
    assert_eq!(set.labels.kind(), Kind::Int64);
    assert_eq!(set.images.min().double_value(&[]), 0.0);
    assert_eq!(set.images.max().double_value(&[]), 1.0);

    let labels = tensor_i64(&set.labels);
    let mut counts = [0usize; 10];
    for &l in &labels {
        assert!((0..10).contains(&l), "label {l} out of range");
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [1000; 10], "exactly 1,000 test images per class");

    // Every pixel is an exact multiple of 1/255.
    let back = (&set.images * 255.0).round() / 255.0;
    let diff = (&set.images - back).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "pixels are k/255: max deviation {diff}");

    // Batching covers the set in order.
    let (xs, ys): (Vec<Tensor>, Vec<Tensor>) = set.batches(3_000).unzip();
    assert_eq!(xs.iter().map(|x| x.size()[0]).collect::<Vec<_>>(), [3_000, 3_000, 3_000, 1_000]);
    assert!(Tensor::cat(&xs, 0).equal(&set.images) && Tensor::cat(&ys, 0).equal(&set.labels), "batches are the set in order");
    assert_eq!(set.take(7).len(), 7);
}
