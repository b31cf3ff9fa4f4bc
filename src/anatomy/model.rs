//! The classifier: an ONNX model (docs/contracts.md "Model file") run with ONNX Runtime.
//!
//! ONNX Runtime is a shared library loaded at run time ([`init_runtime`]), so the binary
//! builds without it and a missing library is an error message, not a link failure. A model
//! is refused at [`Model::load`] unless its interface and `metadata_props` follow the
//! contract; from then on [`Model::info`] gives the preprocessing parameters (classes,
//! input size, HU window) and [`Model::predict`] turns windowed `S×S` images into class
//! probabilities.
//!
//! The input of [`Model::predict`] is what `anatomy::pixels` produces, windowed:
//! `pixels::preprocess` (HU, `S×S`), then [`ModelInfo::to_input`] (`hu_window`, `"unit"`).

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock, PoisonError};

use ort::environment::Environment;
#[cfg(feature = "cuda")]
use ort::ep;
use ort::session::builder::SessionBuilder;
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};

use super::pixels::{window_unit, Framing};

/// File name of the ONNX Runtime library on Linux.
pub const LIBRARY_FILE: &str = "libonnxruntime.so";
/// Environment variable naming the ONNX Runtime library (the name `ort` itself uses).
pub const LIBRARY_ENV: &str = "ORT_DYLIB_PATH";
/// How to get the library; every "library not found" error says it.
pub const INSTALL_HINT: &str = "install it with `bash deploy/install-onnxruntime.sh` (puts it \
     in <project>/.onnxruntime/), or set ORT_DYLIB_PATH to a libonnxruntime.so";
/// Images per `run` call unless [`Model::with_max_batch`] says otherwise: large enough to keep
/// CPU cores and a GPU busy, small enough that a batch of 256×256 inputs stays under 20 MB.
pub const DEFAULT_MAX_BATCH: usize = 64;

/// The input and output names of the contract.
pub const INPUT_NAME: &str = "image";
pub const OUTPUT_NAME: &str = "probabilities";
/// The only `normalization` the node implements ([`ModelInfo::to_input`]).
pub const NORMALIZATION_UNIT: &str = "unit";

/// Where the classifier runs (`classifier.device` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when the binary has the `cuda` feature and the CUDA provider loads, else CPU.
    #[default]
    Auto,
    /// CUDA or an error: never falls back, so a CPU run cannot pass for a GPU run.
    Cuda,
    /// CPU only.
    Cpu,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Auto => "auto",
            Device::Cuda => "cuda",
            Device::Cpu => "cpu",
        })
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Device::Auto),
            "cuda" => Ok(Device::Cuda),
            "cpu" => Ok(Device::Cpu),
            other => Err(format!("unknown device {other:?} (auto, cuda or cpu)")),
        }
    }
}

/// The execution provider a loaded [`Model`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Cuda,
    Cpu,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::Cpu => "CPUExecutionProvider",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("ONNX Runtime library not found (looked for {}); {INSTALL_HINT}", list(.searched))]
    LibraryNotFound { searched: Vec<PathBuf> },
    #[error("ONNX Runtime library {}: {reason}; {INSTALL_HINT}", .path.display())]
    Library { path: PathBuf, reason: String },
    #[error("{}: cannot open the model: {reason}", .file.display())]
    Open { file: PathBuf, reason: String },
    #[error("{}: device {device}: {reason}", .file.display())]
    Provider {
        file: PathBuf,
        device: Device,
        reason: String,
    },
    /// A `metadata_props` entry is missing or breaks the contract.
    #[error("{}: metadata `{key}` {problem}", .file.display())]
    Metadata {
        file: PathBuf,
        key: String,
        problem: String,
    },
    /// The graph's input or output breaks the contract (`name` is `image` or `probabilities`).
    #[error("{}: {kind} `{name}` {problem}", .file.display())]
    Interface {
        file: PathBuf,
        kind: &'static str,
        name: String,
        problem: String,
    },
    #[error("{}: {problem}", .file.display())]
    Input { file: PathBuf, problem: String },
    #[error("{}: inference failed: {reason}", .file.display())]
    Run { file: PathBuf, reason: String },
    #[error("{}: output `{OUTPUT_NAME}` {problem}", .file.display())]
    Output { file: PathBuf, problem: String },
}

fn list(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

// ---------------------------------------------------------------------------------------
// The library

struct Runtime {
    library: PathBuf,
    environment: Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
/// Serialises first loads: `ort` allows one environment per process.
static RUNTIME_INIT: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime once per process. The library is, in order:
/// 1. `library`, when given (`classifier.onnxruntime` in the configuration);
/// 2. the environment variable `ORT_DYLIB_PATH`;
/// 3. the first that exists of [`default_library_paths`]: `libonnxruntime.so` next to the
///    executable, `<exe dir>/../lib/anatomy-node/libonnxruntime.so` (an install under
///    `/usr/local/bin`), and `.onnxruntime/libonnxruntime.so` in the executable's directory or
///    up to four directories above it (a cargo build: `target/{debug,release}[/deps]`, where
///    `deploy/install-onnxruntime.sh` puts it).
///
/// Later calls return at once; one naming another library than the loaded one is an error,
/// as a process cannot switch libraries. [`Model::load`] calls this with `None` when nobody
/// did before, so `ort` never looks for the library itself (it panics when that fails).
pub fn init_runtime(library: Option<&Path>) -> Result<(), ModelError> {
    runtime(library).map(|_| ())
}

/// The library loaded by [`init_runtime`], if any.
pub fn runtime_library() -> Option<&'static Path> {
    RUNTIME.get().map(|r| r.library.as_path())
}

fn runtime(library: Option<&Path>) -> Result<&'static Runtime, ModelError> {
    if let Some(loaded) = RUNTIME.get() {
        return same_library(loaded, library);
    }
    let _first = RUNTIME_INIT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(loaded) = RUNTIME.get() {
        return same_library(loaded, library);
    }
    let path = locate_library(library)?;
    let environment = load_library(&path)?;
    Ok(RUNTIME.get_or_init(|| Runtime {
        library: path,
        environment,
    }))
}

fn same_library(
    loaded: &'static Runtime,
    wanted: Option<&Path>,
) -> Result<&'static Runtime, ModelError> {
    match wanted {
        Some(path) if !same_file(path, &loaded.library) => Err(ModelError::Library {
            path: path.to_path_buf(),
            reason: format!(
                "ONNX Runtime is already loaded from {} and a process can load only one",
                loaded.library.display()
            ),
        }),
        _ => Ok(loaded),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Step 1–3 of [`init_runtime`]; the path returned is absolute (`ort` would otherwise resolve
/// a relative one against the executable's directory, not the working directory).
fn locate_library(library: Option<&Path>) -> Result<PathBuf, ModelError> {
    let explicit = library.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(LIBRARY_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(path) = explicit {
        return Ok(std::path::absolute(&path).unwrap_or(path));
    }
    let searched = default_library_paths();
    match searched.iter().find(|p| p.is_file()) {
        Some(found) => Ok(found.clone()),
        None => Err(ModelError::LibraryNotFound { searched }),
    }
}

/// The default places of the library (see [`init_runtime`]), most specific first.
pub fn default_library_paths() -> Vec<PathBuf> {
    let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    else {
        return Vec::new();
    };
    let mut paths = vec![
        exe_dir.join(LIBRARY_FILE),
        exe_dir.join("../lib/anatomy-node").join(LIBRARY_FILE),
    ];
    paths.extend(
        exe_dir
            .ancestors()
            .take(5)
            .map(|dir| dir.join(".onnxruntime").join(LIBRARY_FILE)),
    );
    paths
}

/// Loads the library and creates the process's ONNX Runtime environment. `ort` reports a
/// missing file or an old version as an error; a panic inside it (an unexpected library) is
/// turned into one too, so the node never dies while loading its classifier.
fn load_library(path: &Path) -> Result<Environment, ModelError> {
    let failed = |reason: String| ModelError::Library {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_file() {
        return Err(failed("no such file".into()));
    }
    let built = catch_unwind(AssertUnwindSafe(|| {
        ort::init_from(path)
            .map_err(|e| e.to_string())?
            .with_name("anatomy-node")
            .with_telemetry(false)
            .build()
            .map_err(|e| e.to_string())
    }));
    let environment = match built {
        Ok(result) => result.map_err(failed)?,
        Err(panic) => {
            return Err(failed(format!(
                "ONNX Runtime panicked: {}",
                panic_text(&panic)
            )))
        }
    };
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    Ok(environment)
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

// ---------------------------------------------------------------------------------------
// Metadata

/// What the model's `metadata_props` say (docs/contracts.md), checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Class names, in the order of the output columns.
    pub classes: Vec<String>,
    /// Side `S` of the square input.
    pub input_size: usize,
    /// `[low, high]` in HU, `low < high`.
    pub hu_window: [f32; 2],
    /// Always `"unit"` today.
    pub normalization: String,
    pub model_version: String,
    pub trained_on: String,
    /// The fitted temperature, already applied inside the graph (informational).
    pub temperature: Option<f64>,
    /// Millimetres the `S×S` input spans (`pixels::Preprocessing::field_of_view_mm`);
    /// absent in models that see each image fitted whole.
    pub field_of_view_mm: Option<f64>,
    /// How images without a field of view are framed (`pixels::Preprocessing::framing`);
    /// key `framing`, `"whole"` when absent. `Body` never comes with `field_of_view_mm`.
    pub framing: Framing,
}

/// A metadata key and what is wrong with it.
type KeyProblem = (&'static str, String);

impl ModelInfo {
    /// Reads and checks every key of the contract; `lookup` returns a key's value.
    pub fn from_metadata(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<ModelInfo, (String, String)> {
        Self::parse(&lookup).map_err(|(key, problem)| (key.to_string(), problem))
    }

    fn parse(lookup: &dyn Fn(&str) -> Option<String>) -> Result<ModelInfo, KeyProblem> {
        let get = |key: &'static str| lookup(key).ok_or((key, "is missing".to_string()));
        let info = ModelInfo {
            classes: parse_classes(&get("classes")?)?,
            input_size: parse_input_size(&get("input_size")?)?,
            hu_window: parse_hu_window(&get("hu_window")?)?,
            normalization: parse_normalization(&get("normalization")?)?,
            model_version: non_empty("model_version", get("model_version")?)?,
            trained_on: non_empty("trained_on", get("trained_on")?)?,
            temperature: lookup("temperature")
                .map(|t| parse_temperature(&t))
                .transpose()?,
            field_of_view_mm: lookup("field_of_view_mm")
                .map(|t| parse_field_of_view(&t))
                .transpose()?,
            framing: lookup("framing")
                .map(|t| parse_framing(&t))
                .transpose()?
                .unwrap_or_default(),
        };
        if let (Framing::Body, Some(mm)) = (info.framing, info.field_of_view_mm) {
            return Err((
                "framing",
                format!(
                    "is \"body\" but the model also has field_of_view_mm {mm}: a model frames \
                     images one way, around the body or a fixed field of view, not both"
                ),
            ));
        }
        Ok(info)
    }

    /// Values per image: `S × S`.
    pub fn image_len(&self) -> usize {
        self.input_size * self.input_size
    }

    /// The model input from HU (`pixels::preprocess`'s output): the contract's `"unit"`
    /// normalisation with this model's window.
    pub fn to_input(&self, hu: &[f32]) -> Vec<f32> {
        let [low, high] = self.hu_window;
        hu.iter().map(|&v| window_unit(v, low, high)).collect()
    }
}

fn parse_classes(text: &str) -> Result<Vec<String>, KeyProblem> {
    let bad = |problem: String| ("classes", problem);
    let classes: Vec<String> = serde_json::from_str(text)
        .map_err(|e| bad(format!("is not a JSON list of names ({e}): {text:?}")))?;
    if classes.is_empty() {
        return Err(bad("is an empty list".into()));
    }
    if let Some(blank) = classes.iter().position(|c| c.trim().is_empty()) {
        return Err(bad(format!("has an empty name at position {blank}")));
    }
    for (i, name) in classes.iter().enumerate() {
        if classes[..i].contains(name) {
            return Err(bad(format!("names {name:?} twice")));
        }
    }
    Ok(classes)
}

fn parse_field_of_view(text: &str) -> Result<f64, KeyProblem> {
    match text.trim().parse::<f64>() {
        Ok(mm) if mm.is_finite() && (10.0..=2000.0).contains(&mm) => Ok(mm),
        _ => Err((
            "field_of_view_mm",
            format!("is not a length in millimetres between 10 and 2000: {text:?}"),
        )),
    }
}

fn parse_framing(text: &str) -> Result<Framing, KeyProblem> {
    text.parse::<Framing>().map_err(|_| {
        (
            "framing",
            format!("is {text:?}; this node frames images \"whole\" or \"body\""),
        )
    })
}

fn parse_input_size(text: &str) -> Result<usize, KeyProblem> {
    match text.trim().parse::<usize>() {
        Ok(size) if size > 0 => Ok(size),
        _ => Err(("input_size", format!("is not a positive integer: {text:?}"))),
    }
}

fn parse_hu_window(text: &str) -> Result<[f32; 2], KeyProblem> {
    let bad = |problem: String| ("hu_window", problem);
    let [low, high]: [f64; 2] = serde_json::from_str(text).map_err(|_| {
        bad(format!(
            "is not a JSON [low, high] pair of numbers: {text:?}"
        ))
    })?;
    if !(low.is_finite() && high.is_finite()) {
        return Err(bad(format!("is not finite: {text:?}")));
    }
    if low >= high {
        return Err(bad(format!("has low >= high: {text:?}")));
    }
    Ok([low as f32, high as f32])
}

fn parse_normalization(text: &str) -> Result<String, KeyProblem> {
    if text == NORMALIZATION_UNIT {
        Ok(text.to_string())
    } else {
        Err((
            "normalization",
            format!("is {text:?}; this node implements only \"{NORMALIZATION_UNIT}\""),
        ))
    }
}

fn parse_temperature(text: &str) -> Result<f64, KeyProblem> {
    match text.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && t > 0.0 => Ok(t),
        _ => Err(("temperature", format!("is not a positive number: {text:?}"))),
    }
}

fn non_empty(key: &'static str, text: String) -> Result<String, KeyProblem> {
    if text.trim().is_empty() {
        Err((key, "is empty".into()))
    } else {
        Ok(text)
    }
}

// ---------------------------------------------------------------------------------------
// The model

/// A loaded, checked classifier. `predict` may be called from many threads at once.
pub struct Model {
    file: PathBuf,
    info: ModelInfo,
    provider: Provider,
    max_batch: usize,
    /// `Session::run` takes `&mut self`; concurrent callers take turns (ONNX Runtime already
    /// spreads one run over its intra-op threads).
    session: Mutex<Session>,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("file", &self.file)
            .field("info", &self.info)
            .field("provider", &self.provider)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Opens `path` on `device` with `threads` intra-op threads (0: ONNX Runtime's default,
    /// one per core) and checks it against the contract. Loads ONNX Runtime first if
    /// [`init_runtime`] was not called.
    pub fn load(path: &Path, device: Device, threads: usize) -> Result<Model, ModelError> {
        let runtime = runtime(None)?;
        let (session, provider) = open_session(runtime, path, device, threads)?;
        let info = check_model(path, &session)?;
        tracing::info!(
            model = %path.display(),
            provider = %provider,
            version = %info.model_version,
            classes = ?info.classes,
            input_size = info.input_size,
            "classifier model loaded"
        );
        Ok(Model {
            file: path.to_path_buf(),
            info,
            provider,
            max_batch: DEFAULT_MAX_BATCH,
            session: Mutex::new(session),
        })
    }

    /// Runs at most `max_batch` images per ONNX Runtime call (at least 1).
    pub fn with_max_batch(mut self, max_batch: usize) -> Model {
        self.max_batch = max_batch.max(1);
        self
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Class probabilities of `n` images: `inputs` holds `n × S × S` normalised values
    /// (image after image, row by row), the result one row of `C` probabilities per image.
    pub fn predict(&self, inputs: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        let per_image = self.info.image_len();
        if Some(inputs.len()) != n.checked_mul(per_image) {
            return Err(ModelError::Input {
                file: self.file.clone(),
                problem: format!(
                    "predict got {} values for {n} images of {s}×{s} ({per_image} each)",
                    inputs.len(),
                    s = self.info.input_size
                ),
            });
        }
        let mut rows = Vec::with_capacity(n);
        for batch in inputs.chunks(self.max_batch * per_image) {
            rows.extend(self.run_batch(batch, batch.len() / per_image)?);
        }
        Ok(rows)
    }

    fn run_batch(&self, batch: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        let run_error = |e: ort::Error| ModelError::Run {
            file: self.file.clone(),
            reason: e.to_string(),
        };
        let s = self.info.input_size;
        let tensor = TensorRef::from_array_view(([n, 1, s, s], batch)).map_err(run_error)?;
        // A panic while holding the lock cannot leave the session half-updated (ONNX Runtime
        // keeps no state between runs), so a poisoned lock is still usable.
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let outputs = session
            .run(ort::inputs![INPUT_NAME => tensor])
            .map_err(run_error)?;
        let Some(output) = outputs.get(OUTPUT_NAME) else {
            return Err(self.output_error("is missing from the run's outputs".into()));
        };
        let (shape, values) = output
            .try_extract_tensor::<f32>()
            .map_err(|e| self.output_error(format!("is not a float32 tensor: {e}")))?;
        self.rows(&shape[..], values, n)
    }

    /// Checks the output of one run (shape `[n, C]`, finite) and splits it into rows.
    fn rows(&self, shape: &[i64], values: &[f32], n: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = self.info.classes.len();
        if shape != [n as i64, c as i64] || values.len() != n * c {
            return Err(self.output_error(format!("has shape {shape:?}, expected [{n}, {c}]")));
        }
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.output_error(format!(
                "is not finite for image {} of the batch (class {:?})",
                bad / c,
                self.info.classes[bad % c]
            )));
        }
        Ok(values.chunks(c).map(<[f32]>::to_vec).collect())
    }

    fn output_error(&self, problem: String) -> ModelError {
        ModelError::Output {
            file: self.file.clone(),
            problem,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Opening and checking a model file

fn open_session(
    runtime: &Runtime,
    path: &Path,
    device: Device,
    threads: usize,
) -> Result<(Session, Provider), ModelError> {
    match device {
        Device::Cpu => Ok((cpu_session(runtime, path, threads)?, Provider::Cpu)),
        Device::Cuda => Ok((cuda_session(runtime, path, threads)?, Provider::Cuda)),
        Device::Auto if cfg!(feature = "cuda") => match cuda_session(runtime, path, threads) {
            Ok(session) => Ok((session, Provider::Cuda)),
            Err(e) => {
                tracing::info!(model = %path.display(), reason = %e, "CUDA unavailable; the classifier runs on the CPU");
                Ok((cpu_session(runtime, path, threads)?, Provider::Cpu))
            }
        },
        Device::Auto => {
            tracing::info!(
                model = %path.display(),
                "built without the `cuda` feature; the classifier runs on the CPU"
            );
            Ok((cpu_session(runtime, path, threads)?, Provider::Cpu))
        }
    }
}

/// Sessions log warnings and errors only: ONNX Runtime's INFO lines (over a hundred while a
/// session is created: graph transformers, allocators) say nothing an operator needs. The
/// log filter keeps the `ort` target at `warn` too (main.rs), unless it names `ort`.
fn builder(runtime: &Runtime, threads: usize) -> Result<SessionBuilder, ort::Error> {
    Ok(Session::builder(&runtime.environment)?
        .with_log_level(ort::logging::LogLevel::Warning)?
        .with_intra_threads(threads)?)
}

fn open_error(path: &Path, e: impl fmt::Display) -> ModelError {
    ModelError::Open {
        file: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn cpu_session(runtime: &Runtime, path: &Path, threads: usize) -> Result<Session, ModelError> {
    if !path.is_file() {
        return Err(open_error(path, "no such file"));
    }
    let mut builder = builder(runtime, threads).map_err(|e| open_error(path, e))?;
    builder
        .commit_from_file(path)
        .map_err(|e| open_error(path, e))
}

/// A session whose CUDA provider registered, or an error: `error_on_failure` stops `ort`
/// from quietly carrying on with the CPU provider.
#[cfg(feature = "cuda")]
fn cuda_session(runtime: &Runtime, path: &Path, threads: usize) -> Result<Session, ModelError> {
    if !path.is_file() {
        return Err(open_error(path, "no such file"));
    }
    let provider_error = |reason: String| ModelError::Provider {
        file: path.to_path_buf(),
        device: Device::Cuda,
        reason,
    };
    let builder = builder(runtime, threads).map_err(|e| open_error(path, e))?;
    let mut builder = builder
        .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
        .map_err(|e| {
            provider_error(format!(
                "the CUDA execution provider does not load ({e}); it needs the onnxruntime-gpu \
                 library with CUDA and cuDNN (../shared/tools/gpu-ort/README.md)"
            ))
        })?;
    builder
        .commit_from_file(path)
        .map_err(|e| provider_error(format!("cannot open the model with CUDA: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_session(_runtime: &Runtime, path: &Path, _threads: usize) -> Result<Session, ModelError> {
    Err(ModelError::Provider {
        file: path.to_path_buf(),
        device: Device::Cuda,
        reason: "this binary was built without the `cuda` feature (cargo build --features cuda)"
            .into(),
    })
}

/// The whole contract: interface first (a wrong input makes the metadata moot), then the
/// metadata, then that both agree.
fn check_model(path: &Path, session: &Session) -> Result<ModelInfo, ModelError> {
    let input = tensor_dims(path, session, "input", INPUT_NAME)?;
    let output = tensor_dims(path, session, "output", OUTPUT_NAME)?;
    let interface = |kind, name: &str, problem: String| ModelError::Interface {
        file: path.to_path_buf(),
        kind,
        name: name.to_string(),
        problem,
    };
    if session.inputs().len() != 1 {
        return Err(interface(
            "input",
            INPUT_NAME,
            format!(
                "must be the only input, the graph has {}",
                session.inputs().len()
            ),
        ));
    }
    if input.len() != 4 || input[1] != 1 {
        return Err(interface(
            "input",
            INPUT_NAME,
            format!("has shape {input:?}, expected [N, 1, S, S]"),
        ));
    }
    if output.len() != 2 {
        return Err(interface(
            "output",
            OUTPUT_NAME,
            format!("has shape {output:?}, expected [N, C]"),
        ));
    }
    let info = read_metadata(path, session)?;
    check_agreement(path, &info, &input, &output)?;
    Ok(info)
}

/// Dimensions of a float32 tensor input or output (`-1` where dynamic).
fn tensor_dims(
    path: &Path,
    session: &Session,
    kind: &'static str,
    name: &str,
) -> Result<Vec<i64>, ModelError> {
    let outlets = if kind == "input" {
        session.inputs()
    } else {
        session.outputs()
    };
    let problem = |problem: String| ModelError::Interface {
        file: path.to_path_buf(),
        kind,
        name: name.to_string(),
        problem,
    };
    let Some(outlet) = outlets.iter().find(|o| o.name() == name) else {
        let names: Vec<&str> = outlets.iter().map(|o| o.name()).collect();
        return Err(problem(format!(
            "is missing (the graph's {kind}s are {names:?})"
        )));
    };
    match outlet.dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape,
            ..
        } => Ok(shape.to_vec()),
        other => Err(problem(format!("is {other:?}, expected a float32 tensor"))),
    }
}

fn read_metadata(path: &Path, session: &Session) -> Result<ModelInfo, ModelError> {
    let metadata = session
        .metadata()
        .map_err(|e| open_error(path, format!("cannot read metadata_props: {e}")))?;
    ModelInfo::from_metadata(|key| metadata.custom(key)).map_err(|(key, problem)| {
        ModelError::Metadata {
            file: path.to_path_buf(),
            key,
            problem,
        }
    })
}

/// `classes` matches the output's `C` and `input_size` the input's `H` and `W` (where the
/// graph fixes them; a dynamic dimension is checked by the run itself).
fn check_agreement(
    path: &Path,
    info: &ModelInfo,
    input: &[i64],
    output: &[i64],
) -> Result<(), ModelError> {
    let metadata = |key: &str, problem: String| ModelError::Metadata {
        file: path.to_path_buf(),
        key: key.to_string(),
        problem,
    };
    let c = output[1];
    if c >= 0 && c as usize != info.classes.len() {
        return Err(metadata(
            "classes",
            format!(
                "names {} classes but output `{OUTPUT_NAME}` has {c}",
                info.classes.len()
            ),
        ));
    }
    for (axis, &dim) in ["H", "W"].iter().zip(&input[2..]) {
        if dim >= 0 && dim as usize != info.input_size {
            return Err(metadata(
                "input_size",
                format!(
                    "is {} but input `{INPUT_NAME}` has {axis} = {dim}",
                    info.input_size
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn good() -> HashMap<&'static str, String> {
        HashMap::from([
            ("classes", r#"["neck","lungs","liver"]"#.to_string()),
            ("input_size", "64".to_string()),
            ("hu_window", "[-100, 200]".to_string()),
            ("normalization", "unit".to_string()),
            ("model_version", "v1".to_string()),
            ("trained_on", "synthetic".to_string()),
        ])
    }

    fn parse(props: &HashMap<&'static str, String>) -> Result<ModelInfo, (String, String)> {
        ModelInfo::from_metadata(|key| props.get(key).cloned())
    }

    fn bad_key(change: impl FnOnce(&mut HashMap<&'static str, String>)) -> String {
        let mut props = good();
        change(&mut props);
        parse(&props).expect_err("must be refused").0
    }

    #[test]
    fn good_metadata_parses() {
        let mut props = good();
        props.insert("temperature", "0.55".into());
        props.insert("field_of_view_mm", "500".into());
        let info = parse(&props).expect("valid");
        assert_eq!(info.field_of_view_mm, Some(500.0));
        assert_eq!(info.framing, Framing::Whole);
        assert_eq!(info.classes, ["neck", "lungs", "liver"]);
        assert_eq!(info.input_size, 64);
        assert_eq!(info.hu_window, [-100.0, 200.0]);
        assert_eq!(info.temperature, Some(0.55));
        assert_eq!(info.image_len(), 64 * 64);
        assert_eq!(
            info.to_input(&[-1024.0, -100.0, 50.0, 200.0, 3000.0]),
            [0.0, 0.0, 0.5, 1.0, 1.0]
        );
    }

    #[test]
    fn every_required_key_is_required() {
        for key in good().keys().copied() {
            assert_eq!(bad_key(|p| drop(p.remove(key))), key);
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: [(&str, &str); 15] = [
            ("classes", "[]"),
            ("classes", r#"["a","a"]"#),
            ("classes", r#"["a",""]"#),
            ("classes", "neck,lungs"),
            ("input_size", "0"),
            ("input_size", "sixty-four"),
            ("hu_window", "[200, -100]"),
            ("hu_window", "[0, 0]"),
            ("hu_window", "[-100]"),
            ("hu_window", "-100,200"),
            ("normalization", "zscore"),
            ("model_version", " "),
            ("temperature", "-1"),
            ("field_of_view_mm", "0"),
            ("field_of_view_mm", "wide"),
        ];
        for (key, value) in cases {
            assert_eq!(
                bad_key(|p| drop(p.insert(key, value.to_string()))),
                key,
                "{key} = {value}"
            );
        }
    }

    #[test]
    fn framing_is_whole_unless_the_model_says_body() {
        assert_eq!(parse(&good()).expect("valid").framing, Framing::Whole);
        for (value, framing) in [
            ("whole", Framing::Whole),
            ("body", Framing::Body),
            (" body ", Framing::Body),
        ] {
            let mut props = good();
            props.insert("framing", value.into());
            assert_eq!(parse(&props).expect(value).framing, framing, "{value:?}");
        }
        // whole framing and a fixed field of view: the field of view frames the images
        let mut props = good();
        props.insert("framing", "whole".into());
        props.insert("field_of_view_mm", "500".into());
        let info = parse(&props).expect("valid");
        assert_eq!(
            (info.framing, info.field_of_view_mm),
            (Framing::Whole, Some(500.0))
        );
    }

    #[test]
    fn an_unknown_framing_is_refused_naming_key_and_value() {
        for value in ["Body", "tight", "", "fixed"] {
            let mut props = good();
            props.insert("framing", value.into());
            let (key, problem) = parse(&props).expect_err(value);
            assert_eq!(key, "framing");
            assert!(problem.contains(&format!("{value:?}")), "{problem}");
        }
    }

    #[test]
    fn body_framing_and_a_field_of_view_are_refused_together() {
        let mut props = good();
        props.insert("framing", "body".into());
        props.insert("field_of_view_mm", "500".into());
        let (key, problem) = parse(&props).expect_err("both");
        assert_eq!(key, "framing");
        assert!(
            problem.contains("body") && problem.contains("field_of_view_mm 500"),
            "{problem}"
        );
    }

    #[test]
    fn device_names() {
        #[derive(serde::Deserialize)]
        struct Classifier {
            device: Device,
        }
        for (text, device) in [
            ("auto", Device::Auto),
            ("cuda", Device::Cuda),
            ("cpu", Device::Cpu),
        ] {
            let parsed: Classifier =
                serde_json::from_str(&format!(r#"{{"device":"{text}"}}"#)).expect("device");
            assert_eq!(parsed.device, device);
            assert_eq!(text.parse::<Device>(), Ok(device));
            assert_eq!(device.to_string(), text);
        }
        assert!(serde_json::from_str::<Classifier>(r#"{"device":"gpu"}"#).is_err());
        assert!("gpu".parse::<Device>().is_err());
    }
}
