//! "Classify these images": the one path from chosen images to class probabilities, shared
//! by the node's classification worker and by `anatomy-node classify`.
//!
//! [`label_images`] takes [`KeyImage`]s (one frame of one file each, usually what
//! [`super::select::select`] chose), decodes them with [`super::pixels`], prepares them
//! exactly as docs/contracts.md says (canonical orientation, pad, resize to the model's
//! `S×S`, the model's window) and runs the model in batches. Files are decoded on a bounded
//! pool of threads while the model runs on the previous chunk, so decoding and inference
//! overlap; every file is opened and decoded once, however many of its frames are asked for.
//! A file that cannot be decoded costs only its own images: it comes back with its error.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

use rayon::prelude::*;

use super::model::{Model, ModelError, ModelInfo};
use super::pixels::{self, PixelError, PixelErrorKind, Preprocessing};
use super::select::KeyImage;

/// One image the model labelled.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledImage {
    pub sop_instance_uid: String,
    pub path: PathBuf,
    /// 0-based frame number within the file.
    pub frame: u32,
    /// Image Position (Patient) z, mm.
    pub z_mm: f64,
    /// One probability per class, in the order of the model's `classes`.
    pub probabilities: Vec<f32>,
}

/// Where the time of one [`label_images`] call went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Files opened and decoded (each once, whatever the number of its frames used).
    pub files: usize,
    /// Images handed to the model.
    pub images: usize,
    /// Chunks of images handed to [`Model::predict`] (each split further by its max batch).
    pub chunks: usize,
    /// Decoding to HU, summed over the decoding threads.
    pub decode_ms: f64,
    /// Orientation, padding, resizing and windowing, summed over the decoding threads.
    pub preprocess_ms: f64,
    /// Time the model ran (wall clock).
    pub infer_ms: f64,
    /// The whole call (wall clock); less than the sum of the others, as decoding on many
    /// threads overlaps inference.
    pub total_ms: f64,
}

/// How [`label_images`] works.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelOptions {
    /// Decoding threads; 0 means one per core.
    pub threads: usize,
    /// Images within this angle of axial are flipped into the canonical orientation
    /// (contract step 3); use the selection's `axial_tolerance_deg`, so every image chosen
    /// as axial is oriented as one.
    pub axial_tolerance_deg: f64,
}

impl LabelOptions {
    /// `threads` decoding threads (0: one per core) and the default axial tolerance.
    pub fn new(threads: usize) -> Self {
        Self {
            threads,
            axial_tolerance_deg: pixels::DEFAULT_AXIAL_TOLERANCE_DEG,
        }
    }
}

/// What [`label_images`] did.
#[derive(Debug)]
pub struct Labelling {
    /// Labelled images, in the order they were given (those that failed left out).
    pub labelled: Vec<LabelledImage>,
    /// Images whose file could not be decoded, each with the reason.
    pub failed: Vec<(KeyImage, PixelError)>,
    pub timings: Timings,
}

/// What stops a whole [`label_images`] call; a file that cannot be decoded does not.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// The model failed to run (its file is named): no image of the call is labelled.
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cannot start {threads} decoding threads: {reason}")]
    Threads { threads: usize, reason: String },
}

/// Decodes `images` on `options.threads` threads, prepares them for `model` and labels them.
/// See the module documentation.
pub fn label_images(
    model: &Model,
    images: &[KeyImage],
    options: &LabelOptions,
) -> Result<Labelling, ClassifyError> {
    let started = Instant::now();
    if images.is_empty() {
        return Ok(Labelling {
            labelled: Vec::new(),
            failed: Vec::new(),
            timings: Timings::default(),
        });
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads)
        .thread_name(|i| format!("decode-{i}"))
        .build()
        .map_err(|e| ClassifyError::Threads {
            threads: options.threads,
            reason: e.to_string(),
        })?;
    let chunks = chunk_files(
        group_by_file(images),
        chunk_images(model.max_batch(), pool.current_num_threads()),
    );
    let preparation = Preparation {
        images,
        info: model.info(),
        preprocessing: Preprocessing {
            size: model.info().input_size,
            axial_tolerance_deg: options.axial_tolerance_deg,
            field_of_view_mm: model.info().field_of_view_mm,
            framing: model.info().framing,
        },
    };
    let (mut timings, failed, inference) = pipeline(model, &pool, &preparation, &chunks);
    let inference = inference?;
    timings.images = inference.rows.len();
    timings.chunks = inference.chunks;
    timings.infer_ms = inference.infer_ms;
    timings.total_ms = ms_since(started);
    Ok(Labelling {
        labelled: labelled_in_order(images, inference.rows),
        failed: failed_in_order(images, failed),
        timings,
    })
}

/// Decodes chunk after chunk on `pool` while a second thread runs the model on the one
/// before: one chunk waits in between, so memory stays at about three chunks.
fn pipeline(
    model: &Model,
    pool: &rayon::ThreadPool,
    preparation: &Preparation,
    chunks: &[Vec<FileGroup>],
) -> (
    Timings,
    Vec<(usize, PixelError)>,
    Result<Inference, ModelError>,
) {
    std::thread::scope(|scope| {
        let (sender, receiver) = sync_channel::<Prepared>(1);
        let inference = scope.spawn(move || infer_chunks(model, receiver));
        let mut timings = Timings::default();
        let mut failed = Vec::new();
        for chunk in chunks {
            let mut prepared = pool.install(|| preparation.prepare(chunk));
            timings.files += chunk.len();
            timings.decode_ms += prepared.decode_ms;
            timings.preprocess_ms += prepared.preprocess_ms;
            failed.append(&mut prepared.failed);
            if sender.send(prepared).is_err() {
                break; // the model failed; its error comes back from the join below
            }
        }
        drop(sender);
        match inference.join() {
            Ok(result) => (timings, failed, result),
            // A panic inside ONNX Runtime is not the input's doing: let it surface.
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Images per chunk: at least one full batch, and enough that every decoding thread has a
/// few files to work on while the model runs.
fn chunk_images(max_batch: usize, threads: usize) -> usize {
    let batch = max_batch.max(1);
    let wanted = 4 * threads.max(1);
    batch * wanted.div_ceil(batch)
}

/// The images of one file: indices into the `images` given to [`label_images`].
#[derive(Debug, Clone, PartialEq)]
struct FileGroup {
    path: PathBuf,
    members: Vec<usize>,
}

/// Images grouped by file, files in the order they first appear, so a multi-frame file is
/// decoded once for all of its frames.
fn group_by_file(images: &[KeyImage]) -> Vec<FileGroup> {
    let mut groups: Vec<FileGroup> = Vec::new();
    let mut index: HashMap<&Path, usize> = HashMap::new();
    for (i, image) in images.iter().enumerate() {
        match index.get(image.path.as_path()) {
            Some(&g) => groups[g].members.push(i),
            None => {
                index.insert(&image.path, groups.len());
                groups.push(FileGroup {
                    path: image.path.clone(),
                    members: vec![i],
                });
            }
        }
    }
    groups
}

/// Whole files into chunks of about `size` images (a file is never split: it is decoded
/// once).
fn chunk_files(groups: Vec<FileGroup>, size: usize) -> Vec<Vec<FileGroup>> {
    let mut chunks: Vec<Vec<FileGroup>> = Vec::new();
    let mut current: Vec<FileGroup> = Vec::new();
    let mut count = 0;
    for group in groups {
        count += group.members.len();
        current.push(group);
        if count >= size {
            chunks.push(std::mem::take(&mut current));
            count = 0;
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// A chunk ready for the model.
struct Prepared {
    /// Indices of the images, in the order of `inputs`.
    members: Vec<usize>,
    /// `members.len() × S × S` windowed values.
    inputs: Vec<f32>,
    failed: Vec<(usize, PixelError)>,
    decode_ms: f64,
    preprocess_ms: f64,
}

struct Preparation<'a> {
    images: &'a [KeyImage],
    info: &'a ModelInfo,
    preprocessing: Preprocessing,
}

/// One file's images as model inputs, or the file's error.
struct FileResult {
    outcome: Result<Vec<(usize, Vec<f32>)>, PixelError>,
    members: Vec<usize>,
    decode_ms: f64,
    preprocess_ms: f64,
}

impl Preparation<'_> {
    /// Decodes and prepares the files of a chunk in parallel (on the current pool).
    fn prepare(&self, chunk: &[FileGroup]) -> Prepared {
        let results: Vec<FileResult> = chunk.par_iter().map(|g| self.prepare_file(g)).collect();
        let mut prepared = Prepared {
            members: Vec::new(),
            inputs: Vec::new(),
            failed: Vec::new(),
            decode_ms: 0.0,
            preprocess_ms: 0.0,
        };
        for result in results {
            prepared.decode_ms += result.decode_ms;
            prepared.preprocess_ms += result.preprocess_ms;
            match result.outcome {
                Ok(inputs) => {
                    for (i, input) in inputs {
                        prepared.members.push(i);
                        prepared.inputs.extend(input);
                    }
                }
                Err(error) => prepared
                    .failed
                    .extend(result.members.iter().map(|&i| (i, same_error(&error)))),
            }
        }
        prepared
    }

    fn prepare_file(&self, group: &FileGroup) -> FileResult {
        let decode_started = Instant::now();
        // dicom-rs decoders are not hardened against every malformed codestream; a panic in
        // one must cost only this file, never the node.
        let decoded = catch_unwind(AssertUnwindSafe(|| pixels::hu_frames(&group.path)))
            .unwrap_or_else(|panic| Err(self.decoder_panic(group, &panic)));
        let decode_ms = ms_since(decode_started);
        let preprocess_started = Instant::now();
        let outcome = decoded.and_then(|frames| self.inputs_of(group, &frames));
        FileResult {
            outcome,
            members: group.members.clone(),
            decode_ms,
            preprocess_ms: ms_since(preprocess_started),
        }
    }

    /// The model inputs of the group's frames (frames in parallel: a multi-frame file can
    /// hold hundreds).
    fn inputs_of(
        &self,
        group: &FileGroup,
        frames: &[pixels::HuImage],
    ) -> Result<Vec<(usize, Vec<f32>)>, PixelError> {
        group
            .members
            .par_iter()
            .map(|&i| {
                let frame = self.images[i].frame;
                let image = frames.get(frame as usize).ok_or_else(|| PixelError {
                    file: group.path.clone(),
                    kind: PixelErrorKind::InvalidAttribute {
                        name: "NumberOfFrames",
                        reason: format!(
                            "frame {frame} was asked for, the file has {}",
                            frames.len()
                        ),
                    },
                })?;
                let hu = pixels::preprocess(image, &self.preprocessing);
                Ok((i, self.info.to_input(&hu)))
            })
            .collect()
    }

    fn decoder_panic(
        &self,
        group: &FileGroup,
        panic: &Box<dyn std::any::Any + Send>,
    ) -> PixelError {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        let frame = group.members.first().map_or(0, |&i| self.images[i].frame);
        PixelError {
            file: group.path.clone(),
            kind: PixelErrorKind::CorruptPixelData {
                frame,
                reason: format!("the decoder failed: {text}"),
            },
        }
    }
}

/// `PixelError` holds no source, so a copy for each image of a failed file is exact.
fn same_error(error: &PixelError) -> PixelError {
    PixelError {
        file: error.file.clone(),
        kind: error.kind.clone(),
    }
}

/// Images that failed, in the order they were given, with their errors.
fn failed_in_order(
    images: &[KeyImage],
    mut failed: Vec<(usize, PixelError)>,
) -> Vec<(KeyImage, PixelError)> {
    failed.sort_by_key(|(i, _)| *i);
    failed
        .into_iter()
        .map(|(i, e)| (images[i].clone(), e))
        .collect()
}

/// What the inference side of [`label_images`] did.
struct Inference {
    /// (index of the image, its probabilities), in the order the chunks arrived.
    rows: Vec<(usize, Vec<f32>)>,
    chunks: usize,
    infer_ms: f64,
}

/// Runs the model on each prepared chunk as it arrives; the first model error ends it
/// (dropping the receiver stops the decoding side).
fn infer_chunks(model: &Model, chunks: Receiver<Prepared>) -> Result<Inference, ModelError> {
    let mut inference = Inference {
        rows: Vec::new(),
        chunks: 0,
        infer_ms: 0.0,
    };
    for chunk in chunks {
        if chunk.members.is_empty() {
            continue;
        }
        let started = Instant::now();
        let probabilities = model.predict(&chunk.inputs, chunk.members.len())?;
        inference.infer_ms += ms_since(started);
        inference.chunks += 1;
        inference
            .rows
            .extend(chunk.members.into_iter().zip(probabilities));
    }
    Ok(inference)
}

/// Labelled images in the order the images were given.
fn labelled_in_order(images: &[KeyImage], mut rows: Vec<(usize, Vec<f32>)>) -> Vec<LabelledImage> {
    rows.sort_by_key(|(i, _)| *i);
    rows.into_iter()
        .map(|(i, probabilities)| {
            let image = &images[i];
            LabelledImage {
                sop_instance_uid: image.sop_instance_uid.clone(),
                path: image.path.clone(),
                frame: image.frame,
                z_mm: image.z_mm,
                probabilities,
            }
        })
        .collect()
}

fn ms_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: &str, frame: u32) -> KeyImage {
        KeyImage {
            sop_instance_uid: format!("uid-{path}"),
            path: PathBuf::from(path),
            frame,
            z_mm: -f64::from(frame),
        }
    }

    #[test]
    fn frames_of_one_file_form_one_group_in_first_appearance_order() {
        let images = [
            key("b", 0),
            key("a", 0),
            key("b", 1),
            key("c", 0),
            key("b", 2),
        ];
        let groups = group_by_file(&images);
        let paths: Vec<&Path> = groups.iter().map(|g| g.path.as_path()).collect();
        assert_eq!(paths, [Path::new("b"), Path::new("a"), Path::new("c")]);
        assert_eq!(groups[0].members, [0, 2, 4]);
    }

    #[test]
    fn chunks_keep_files_whole() {
        let mut images: Vec<KeyImage> = (0..5).map(|f| key("multi", f)).collect();
        images.extend((0..7).map(|i| key(&format!("single{i}"), 0)));
        let chunks = chunk_files(group_by_file(&images), 4);
        let sizes: Vec<usize> = chunks
            .iter()
            .map(|c| c.iter().map(|g| g.members.len()).sum())
            .collect();
        assert_eq!(sizes, [5, 4, 3], "the 5-frame file stays in one chunk");
    }

    #[test]
    fn chunk_size_is_whole_batches_and_feeds_every_thread() {
        assert_eq!(chunk_images(64, 16), 64);
        assert_eq!(chunk_images(64, 32), 128);
        assert_eq!(chunk_images(1, 4), 16);
        assert_eq!(chunk_images(0, 0), 4);
    }
}
