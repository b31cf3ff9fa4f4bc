//! One pass over a received data set, without loading pixel data: proves it is well formed
//! to its last byte (every length fits, every sequence and item is closed) and extracts the
//! attributes the index keeps. Pixel data and other large values are skipped by seeking.

use std::io::{self, BufReader, Read, Seek, SeekFrom};

use dicom_encoding::text::{SpecificCharacterSet, TextCodec};

use super::layout::trim_uid;

/// Deepest sequence nesting accepted; real data sets stay far below, a hostile one does not.
const MAX_DEPTH: usize = 24;
/// Longest value read into memory for the summary; longer values of summary tags are refused.
const MAX_SUMMARY_VALUE: u32 = 4096;

const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_DELIMITER: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_DELIMITER: (u16, u16) = (0xFFFE, 0xE0DD);
const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// The attributes of a received instance that the index keeps, as received.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatasetSummary {
    pub specific_character_set: Option<String>,
    pub image_type: Option<String>,
    pub sop_class_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    pub study_date: Option<String>,
    pub study_time: Option<String>,
    pub accession_number: Option<String>,
    pub modality: Option<String>,
    pub study_description: Option<String>,
    pub series_description: Option<String>,
    pub patient_name: Option<String>,
    pub patient_id: Option<String>,
    pub issuer_of_patient_id: Option<String>,
    pub patient_birth_date: Option<String>,
    pub patient_sex: Option<String>,
    pub body_part_examined: Option<String>,
    pub study_uid: Option<String>,
    pub series_uid: Option<String>,
    pub study_id: Option<String>,
    pub series_number: Option<i64>,
    pub instance_number: Option<i64>,
    pub image_position: Option<String>,
    pub image_orientation: Option<String>,
    pub number_of_frames: Option<i64>,
    pub rows: Option<i64>,
    pub columns: Option<i64>,
    pub samples_per_pixel: Option<i64>,
    pub bits_allocated: Option<i64>,
    /// Length of top-level Pixel Data: `Some(None)` when encapsulated (undefined length).
    pub pixel_data_length: Option<Option<u64>>,
}

impl DatasetSummary {
    /// Bytes that native (uncompressed) pixel data must hold, when the image attributes
    /// needed to know it are present.
    pub fn expected_native_pixel_bytes(&self) -> Option<u64> {
        let rows = u64::try_from(self.rows?).ok()?;
        let columns = u64::try_from(self.columns?).ok()?;
        let frames = u64::try_from(self.number_of_frames.unwrap_or(1).max(1)).ok()?;
        let samples = u64::try_from(self.samples_per_pixel.unwrap_or(1).max(1)).ok()?;
        let bits = u64::try_from(self.bits_allocated?).ok()?;
        Some((rows * columns * frames * samples * bits).div_ceil(8))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The peer sent something that is not a well-formed data set.
    #[error("malformed data set at byte {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
    #[error("transfer syntax {0} is not one this node stores")]
    UnsupportedTransferSyntax(String),
    /// Reading our own temporary file failed: a local problem, not the peer's.
    #[error("reading the received data set: {0}")]
    Io(#[source] io::Error),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    ExplicitLe,
    ImplicitLe,
}

/// Where a data set (or item) ends.
#[derive(Clone, Copy)]
enum End {
    /// The top-level data set runs to the end of the stream.
    Stream,
    /// A defined length: ends exactly at this offset.
    At(u64),
    /// An item of undefined length: ends at an item delimiter.
    ItemDelimiter,
}

/// Byte source that knows its position and, when it can, seeks instead of reading.
trait Source {
    fn read_exact_at_pos(&mut self, buf: &mut [u8]) -> io::Result<()>;
    fn skip(&mut self, n: u64) -> io::Result<()>;
    fn pos(&self) -> u64;
    /// Total length when known in advance (plain files).
    fn len(&self) -> Option<u64>;
    /// True when no byte is left (only asked at element boundaries).
    fn at_end(&mut self) -> io::Result<bool>;
}

struct FileSource<R> {
    inner: BufReader<R>,
    pos: u64,
    len: u64,
}

impl<R: Read + Seek> Source for FileSource<R> {
    fn read_exact_at_pos(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }
    fn skip(&mut self, n: u64) -> io::Result<()> {
        if self.pos + n > self.len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.inner.seek_relative(n as i64)?;
        self.pos += n;
        Ok(())
    }
    fn pos(&self) -> u64 {
        self.pos
    }
    fn len(&self) -> Option<u64> {
        Some(self.len)
    }
    fn at_end(&mut self) -> io::Result<bool> {
        Ok(self.pos >= self.len)
    }
}

/// A deflated data set: lengths cannot be checked in advance, skipping means inflating.
struct StreamSource<R> {
    inner: R,
    pos: u64,
    peeked: Option<u8>,
    /// Most bytes the stream may inflate to.
    limit: u64,
}

impl<R> StreamSource<R> {
    fn check_limit(&self, n: u64) -> io::Result<()> {
        if self.pos.saturating_add(n) > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the data set inflates beyond {} MiB", self.limit >> 20),
            ));
        }
        Ok(())
    }
}

impl<R: Read> Source for StreamSource<R> {
    fn read_exact_at_pos(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.check_limit(buf.len() as u64)?;
        let mut start = 0;
        if let (Some(b), Some(first)) = (self.peeked, buf.first_mut()) {
            *first = b;
            self.peeked = None;
            start = 1;
        }
        self.inner.read_exact(&mut buf[start..])?;
        self.pos += buf.len() as u64;
        Ok(())
    }
    fn skip(&mut self, n: u64) -> io::Result<()> {
        self.check_limit(n)?;
        let mut remaining = n;
        if remaining > 0 && self.peeked.take().is_some() {
            remaining -= 1;
        }
        let copied = io::copy(&mut (&mut self.inner).take(remaining), &mut io::sink())?;
        if copied != remaining {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n;
        Ok(())
    }
    fn pos(&self) -> u64 {
        self.pos
    }
    fn len(&self) -> Option<u64> {
        None
    }
    fn at_end(&mut self) -> io::Result<bool> {
        if self.peeked.is_some() {
            return Ok(false);
        }
        let mut b = [0u8; 1];
        loop {
            match self.inner.read(&mut b) {
                Ok(0) => return Ok(true),
                Ok(_) => {
                    self.peeked = Some(b[0]);
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The transfer syntaxes whose data sets this module can walk, and how they are encoded.
fn encoding_of(ts_uid: &str) -> Option<(Encoding, bool)> {
    match ts_uid {
        "1.2.840.10008.1.2" => Some((Encoding::ImplicitLe, false)),
        "1.2.840.10008.1.2.1.99" => Some((Encoding::ExplicitLe, true)),
        // Explicit VR Little Endian and every encapsulated (compressed) syntax use
        // Explicit VR Little Endian for the data set itself.
        uid if uid == "1.2.840.10008.1.2.1"
            || uid.starts_with("1.2.840.10008.1.2.4.")
            || uid == "1.2.840.10008.1.2.5" =>
        {
            Some((Encoding::ExplicitLe, false))
        }
        _ => None,
    }
}

/// A deflated data set may inflate to this much whatever its size…
const INFLATED_FLOOR: u64 = 64 << 20;
/// …and to this many times its deflated size beyond that (CT deflates 2–4 times). A few
/// megabytes of zeros inflate to gigabytes, which dicom-object would hold in memory when
/// the classifier opens the file (issue #18).
const INFLATION_RATIO: u64 = 32;

/// Inspect the data set stored in `file` from byte `offset` to its end.
pub fn inspect_file<R: Read + Seek>(
    file: R,
    offset: u64,
    ts_uid: &str,
) -> Result<DatasetSummary, InspectError> {
    inspect_with(file, offset, ts_uid, INFLATED_FLOOR)
}

fn inspect_with<R: Read + Seek>(
    mut file: R,
    offset: u64,
    ts_uid: &str,
    inflated_floor: u64,
) -> Result<DatasetSummary, InspectError> {
    let (encoding, deflated) = encoding_of(ts_uid)
        .ok_or_else(|| InspectError::UnsupportedTransferSyntax(ts_uid.to_string()))?;
    let end = file.seek(SeekFrom::End(0)).map_err(InspectError::Io)?;
    file.seek(SeekFrom::Start(offset))
        .map_err(InspectError::Io)?;
    if deflated {
        let inflater = flate2::read::DeflateDecoder::new(BufReader::new(file));
        let mut walker = Walker::new(
            StreamSource {
                inner: inflater,
                pos: 0,
                peeked: None,
                limit: end
                    .saturating_sub(offset)
                    .saturating_mul(INFLATION_RATIO)
                    .max(inflated_floor),
            },
            encoding,
        );
        walker.walk_top()?;
        Ok(walker.summary)
    } else {
        let mut walker = Walker::new(
            FileSource {
                inner: BufReader::with_capacity(16 * 1024, file),
                pos: 0,
                len: end.saturating_sub(offset),
            },
            encoding,
        );
        walker.walk_top()?;
        Ok(walker.summary)
    }
}

struct Header {
    tag: (u16, u16),
    vr: [u8; 2],
    len: u32,
}

struct Walker<S> {
    src: S,
    encoding: Encoding,
    summary: DatasetSummary,
    charset: SpecificCharacterSet,
}

impl<S: Source> Walker<S> {
    fn new(src: S, encoding: Encoding) -> Self {
        Self {
            src,
            encoding,
            summary: DatasetSummary::default(),
            charset: SpecificCharacterSet::default(),
        }
    }

    fn malformed(&self, reason: impl Into<String>) -> InspectError {
        InspectError::Malformed {
            offset: self.src.pos(),
            reason: reason.into(),
        }
    }

    /// Map a read error: running out of bytes or a corrupt deflate stream is the peer's
    /// fault; anything else is ours.
    fn read_error(&self, e: io::Error, what: &str) -> InspectError {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => self.malformed(format!("truncated in {what}")),
            io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => {
                self.malformed(format!("corrupt deflated stream in {what}: {e}"))
            }
            _ => InspectError::Io(e),
        }
    }

    fn read_bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], InspectError> {
        let mut buf = [0u8; N];
        self.src
            .read_exact_at_pos(&mut buf)
            .map_err(|e| self.read_error(e, what))?;
        Ok(buf)
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), InspectError> {
        if let Some(len) = self.src.len() {
            if self.src.pos() + n > len {
                return Err(self.malformed(format!(
                    "{what} claims {n} bytes but only {} remain",
                    len - self.src.pos()
                )));
            }
        }
        self.src.skip(n).map_err(|e| self.read_error(e, what))
    }

    fn read_header(&mut self, encoding: Encoding) -> Result<Header, InspectError> {
        let raw: [u8; 8] = self.read_bytes("element header")?;
        let group = u16::from_le_bytes([raw[0], raw[1]]);
        let element = u16::from_le_bytes([raw[2], raw[3]]);
        if group == 0xFFFE || encoding == Encoding::ImplicitLe {
            let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
            // Implicit VR: the VR dicom-parser will give it (a sequence of defined length
            // is walked, not skipped, as the parser will read its items).
            let vr = if group == 0xFFFE {
                *b"  "
            } else {
                implicit_vr((group, element))
            };
            return Ok(Header {
                tag: (group, element),
                vr,
                len,
            });
        }
        let vr = [raw[4], raw[5]];
        if !vr.iter().all(u8::is_ascii_uppercase) {
            return Err(self.malformed(format!(
                "({group:04X},{element:04X}) has no valid VR ({:02X} {:02X})",
                vr[0], vr[1]
            )));
        }
        let len = if has_long_length(vr) {
            let ext: [u8; 4] = self.read_bytes("element length")?;
            u32::from_le_bytes(ext)
        } else {
            u32::from(u16::from_le_bytes([raw[6], raw[7]]))
        };
        Ok(Header {
            tag: (group, element),
            vr,
            len,
        })
    }

    fn walk_top(&mut self) -> Result<(), InspectError> {
        if self
            .src
            .at_end()
            .map_err(|e| self.read_error(e, "data set"))?
        {
            return Err(self.malformed("empty data set"));
        }
        self.walk_dataset(End::Stream, 0, self.encoding)
    }

    fn walk_dataset(
        &mut self,
        end: End,
        depth: usize,
        encoding: Encoding,
    ) -> Result<(), InspectError> {
        loop {
            match end {
                End::Stream => {
                    if self
                        .src
                        .at_end()
                        .map_err(|e| self.read_error(e, "data set"))?
                    {
                        return Ok(());
                    }
                }
                End::At(limit) => {
                    if self.src.pos() == limit {
                        return Ok(());
                    }
                    if self.src.pos() > limit {
                        return Err(self.malformed("element overruns its item"));
                    }
                }
                End::ItemDelimiter => {}
            }
            let header = self.read_header(encoding)?;
            if header.tag == ITEM_DELIMITER {
                return match end {
                    End::ItemDelimiter => Ok(()),
                    _ => Err(self.malformed("item delimiter outside an item")),
                };
            }
            if header.tag.0 == 0xFFFE {
                return Err(self.malformed(format!(
                    "unexpected ({:04X},{:04X}) inside a data set",
                    header.tag.0, header.tag.1
                )));
            }
            self.walk_element(&header, depth, encoding)?;
            if let End::At(limit) = end {
                if self.src.pos() > limit {
                    return Err(self.malformed("element overruns its item"));
                }
            }
        }
    }

    fn walk_element(
        &mut self,
        h: &Header,
        depth: usize,
        encoding: Encoding,
    ) -> Result<(), InspectError> {
        let name = format!("({:04X},{:04X})", h.tag.0, h.tag.1);
        if depth == 0 && h.tag == PIXEL_DATA {
            self.summary.pixel_data_length = Some((h.len != UNDEFINED).then_some(u64::from(h.len)));
        }
        if h.len == UNDEFINED {
            return if h.tag == PIXEL_DATA && encoding == Encoding::ExplicitLe && &h.vr != b"SQ" {
                self.walk_fragments()
            } else if encoding == Encoding::ImplicitLe || &h.vr == b"SQ" {
                self.walk_sequence(None, depth, encoding)
            } else if &h.vr == b"UN" {
                // PS3.5 6.2.2: UN of undefined length holds a sequence in Implicit VR LE.
                self.walk_sequence(None, depth, Encoding::ImplicitLe)
            } else {
                Err(self.malformed(format!("{name} has undefined length but is not a sequence")))
            };
        }
        if &h.vr == b"SQ" {
            let limit = self.src.pos() + u64::from(h.len);
            self.check_fits(u64::from(h.len), &name)?;
            return self.walk_sequence(Some(limit), depth, encoding);
        }
        check_value_length(h.vr, h.len).map_err(|why| self.malformed(format!("{name} {why}")))?;
        if depth == 0 && is_summary_tag(h.tag) {
            if h.len > MAX_SUMMARY_VALUE {
                return Err(self.malformed(format!("{name} is {} bytes long", h.len)));
            }
            let mut value = vec![0u8; h.len as usize];
            self.src
                .read_exact_at_pos(&mut value)
                .map_err(|e| self.read_error(e, &name))?;
            self.record(h.tag, &value);
            return Ok(());
        }
        self.skip(u64::from(h.len), &name)
    }

    fn check_fits(&self, n: u64, what: &str) -> Result<(), InspectError> {
        match self.src.len() {
            Some(len) if self.src.pos() + n > len => Err(self.malformed(format!(
                "{what} claims {n} bytes but only {} remain",
                len - self.src.pos()
            ))),
            _ => Ok(()),
        }
    }

    /// Items of a sequence, up to `limit` (defined length) or a sequence delimiter.
    fn walk_sequence(
        &mut self,
        limit: Option<u64>,
        depth: usize,
        encoding: Encoding,
    ) -> Result<(), InspectError> {
        if depth >= MAX_DEPTH {
            return Err(self.malformed("sequences nested too deeply"));
        }
        loop {
            if let Some(limit) = limit {
                if self.src.pos() == limit {
                    return Ok(());
                }
            }
            let raw: [u8; 8] = self.read_bytes("sequence item header")?;
            let tag = (
                u16::from_le_bytes([raw[0], raw[1]]),
                u16::from_le_bytes([raw[2], raw[3]]),
            );
            let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
            match tag {
                ITEM if len == UNDEFINED => {
                    self.walk_dataset(End::ItemDelimiter, depth + 1, encoding)?;
                }
                ITEM => {
                    self.check_fits(u64::from(len), "sequence item")?;
                    let end = self.src.pos() + u64::from(len);
                    self.walk_dataset(End::At(end), depth + 1, encoding)?;
                }
                SEQUENCE_DELIMITER if limit.is_none() => return Ok(()),
                _ => {
                    return Err(self.malformed(format!(
                        "expected a sequence item, found ({:04X},{:04X})",
                        tag.0, tag.1
                    )))
                }
            }
            if let Some(limit) = limit {
                if self.src.pos() > limit {
                    return Err(self.malformed("item overruns its sequence"));
                }
            }
        }
    }

    /// Encapsulated pixel data: an offset table and fragments, closed by a delimiter.
    fn walk_fragments(&mut self) -> Result<(), InspectError> {
        loop {
            let raw: [u8; 8] = self.read_bytes("pixel data fragment header")?;
            let tag = (
                u16::from_le_bytes([raw[0], raw[1]]),
                u16::from_le_bytes([raw[2], raw[3]]),
            );
            let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
            match tag {
                ITEM if len != UNDEFINED => self.skip(u64::from(len), "pixel data fragment")?,
                SEQUENCE_DELIMITER => return Ok(()),
                _ => {
                    return Err(self.malformed(format!(
                        "expected a pixel data fragment, found ({:04X},{:04X})",
                        tag.0, tag.1
                    )))
                }
            }
        }
    }

    fn record(&mut self, tag: (u16, u16), value: &[u8]) {
        if tag == (0x0008, 0x0005) {
            let raw = String::from_utf8_lossy(value);
            // The first value names the default repertoire; ISO 2022 extensions beyond it
            // are decoded best-effort.
            let code = raw.split('\\').map(str::trim).find(|c| !c.is_empty());
            if let Some(cs) = code.and_then(SpecificCharacterSet::from_code) {
                self.charset = cs;
            }
            self.summary.specific_character_set = text(&self.charset, value);
            return;
        }
        let cs = &self.charset;
        let s = &mut self.summary;
        match tag {
            (0x0008, 0x0008) => s.image_type = text(cs, value),
            (0x0008, 0x0016) => s.sop_class_uid = uid(value),
            (0x0008, 0x0018) => s.sop_instance_uid = uid(value),
            (0x0008, 0x0020) => s.study_date = text(cs, value),
            (0x0008, 0x0030) => s.study_time = text(cs, value),
            (0x0008, 0x0050) => s.accession_number = text(cs, value),
            (0x0008, 0x0060) => s.modality = text(cs, value),
            (0x0008, 0x1030) => s.study_description = text(cs, value),
            (0x0008, 0x103E) => s.series_description = text(cs, value),
            (0x0010, 0x0010) => s.patient_name = text(cs, value),
            (0x0010, 0x0020) => s.patient_id = text(cs, value),
            (0x0010, 0x0021) => s.issuer_of_patient_id = text(cs, value),
            (0x0010, 0x0030) => s.patient_birth_date = text(cs, value),
            (0x0010, 0x0040) => s.patient_sex = text(cs, value),
            (0x0018, 0x0015) => s.body_part_examined = text(cs, value),
            (0x0020, 0x000D) => s.study_uid = uid(value),
            (0x0020, 0x000E) => s.series_uid = uid(value),
            (0x0020, 0x0010) => s.study_id = text(cs, value),
            (0x0020, 0x0011) => s.series_number = integer(cs, value),
            (0x0020, 0x0013) => s.instance_number = integer(cs, value),
            (0x0020, 0x0032) => s.image_position = text(cs, value),
            (0x0020, 0x0037) => s.image_orientation = text(cs, value),
            (0x0028, 0x0008) => s.number_of_frames = integer(cs, value),
            (0x0028, 0x0010) => s.rows = us_value(value),
            (0x0028, 0x0011) => s.columns = us_value(value),
            (0x0028, 0x0002) => s.samples_per_pixel = us_value(value),
            (0x0028, 0x0100) => s.bits_allocated = us_value(value),
            _ => {}
        }
    }
}

fn text(charset: &SpecificCharacterSet, value: &[u8]) -> Option<String> {
    let decoded = charset
        .decode(value)
        .unwrap_or_else(|_| String::from_utf8_lossy(value).into_owned());
    let trimmed = decoded.trim_matches(|c: char| c == ' ' || c == '\0');
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

fn uid(value: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(value);
    let t = trim_uid(&s);
    (!t.is_empty()).then(|| t.to_string())
}

fn integer(charset: &SpecificCharacterSet, value: &[u8]) -> Option<i64> {
    let text = text(charset, value)?;
    let first = text.split('\\').next()?.trim();
    first.parse::<i64>().ok().or_else(|| {
        // Some senders write IS values such as "12.0".
        first
            .parse::<f64>()
            .ok()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
            .map(|f| f as i64)
    })
}

fn us_value(value: &[u8]) -> Option<i64> {
    (value.len() >= 2).then(|| i64::from(u16::from_le_bytes([value[0], value[1]])))
}

fn is_summary_tag(tag: (u16, u16)) -> bool {
    matches!(
        tag,
        (
            0x0008,
            0x0005 | 0x0008 | 0x0016 | 0x0018 | 0x0020 | 0x0030 | 0x0050 | 0x0060 | 0x1030 | 0x103E
        ) | (0x0010, 0x0010 | 0x0020 | 0x0021 | 0x0030 | 0x0040)
            | (0x0018, 0x0015)
            | (
                0x0020,
                0x000D | 0x000E | 0x0010 | 0x0011 | 0x0013 | 0x0032 | 0x0037
            )
            | (0x0028, 0x0002 | 0x0008 | 0x0010 | 0x0011 | 0x0100)
    )
}

/// The VR dicom-parser gives an element in Implicit VR Little Endian: OW for Pixel Data
/// and Overlay Data, the dictionary's for the rest, UN for what it does not know.
pub fn implicit_vr(tag: (u16, u16)) -> [u8; 2] {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    if tag == PIXEL_DATA || (tag.0 >> 8 == 0x60 && tag.1 == 0x3000) {
        return *b"OW";
    }
    let vr = dicom_dictionary_std::StandardDataDictionary
        .by_tag(dicom_core::Tag(tag.0, tag.1))
        .map(|e| e.vr().relaxed())
        .unwrap_or(dicom_core::VR::UN);
    let name = vr.to_string().as_bytes();
    [name[0], name[1]]
}

/// Bytes per value of a binary VR (1 for the others).
pub fn value_size(vr: [u8; 2]) -> u32 {
    match &vr {
        b"US" | b"SS" | b"OW" => 2,
        b"UL" | b"SL" | b"FL" | b"AT" | b"OF" | b"OL" => 4,
        b"FD" | b"OD" | b"SV" | b"UV" | b"OV" => 8,
        _ => 1,
    }
}

/// A defined length of a binary VR must hold whole values: dicom-parser reads
/// `len / size` values and leaves the remainder unread, so from there on it reads element
/// headers out of phase with every walker that skips `len` bytes, and takes value bytes for
/// lengths (issue #18: 493 MB from a 173-byte command set).
pub fn check_value_length(vr: [u8; 2], len: u32) -> Result<(), String> {
    let size = value_size(vr);
    if len != UNDEFINED && len % size != 0 {
        return Err(format!(
            "is {} with a length of {len}, not a multiple of {size}",
            String::from_utf8_lossy(&vr)
        ));
    }
    Ok(())
}

/// PS3.5 7.1.2: VRs whose explicit encoding has a reserved field and a 32-bit length.
///
/// A VR the standard does not define counts as UN, as dicom-parser reads it (reserved
/// field and 32-bit length): the structure checks here must agree with the parser that
/// reads the same bytes afterwards, or a 16-bit length they skip becomes a 32-bit length
/// it allocates (issue #18: two uppercase letters such as `PJ` turned `DOE*` into a
/// 709 MB value).
pub fn has_long_length(vr: [u8; 2]) -> bool {
    dicom_core::VR::from_binary(vr).is_none()
        || matches!(
            &vr,
            b"OB"
                | b"OD"
                | b"OF"
                | b"OL"
                | b"OV"
                | b"OW"
                | b"SQ"
                | b"SV"
                | b"UC"
                | b"UN"
                | b"UR"
                | b"UT"
                | b"UV"
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn el_explicit(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], value: &[u8]) {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(vr);
        if has_long_length(*vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
    }

    fn sample() -> Vec<u8> {
        let mut d = Vec::new();
        el_explicit(
            &mut d,
            0x0008,
            0x0016,
            b"UI",
            b"1.2.840.10008.5.1.4.1.1.2\0",
        );
        el_explicit(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
        el_explicit(&mut d, 0x0010, 0x0010, b"PN", b"Doe^John");
        // an undefined-length sequence with one undefined-length item
        d.extend_from_slice(&[
            0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        el_explicit(&mut d, 0x0008, 0x1150, b"UI", b"1.2\0");
        d.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        el_explicit(&mut d, 0x0020, 0x0013, b"IS", b"7 ");
        el_explicit(&mut d, 0x0028, 0x0010, b"US", &512u16.to_le_bytes());
        el_explicit(&mut d, 0x7FE0, 0x0010, b"OW", &[0u8; 64]);
        d
    }

    #[test]
    fn well_formed_data_set_is_summarised() {
        let s = inspect_file(Cursor::new(sample()), 0, "1.2.840.10008.1.2.1").expect("valid");
        assert_eq!(s.sop_instance_uid.as_deref(), Some("1.2.3.4"));
        assert_eq!(s.patient_name.as_deref(), Some("Doe^John"));
        assert_eq!(s.instance_number, Some(7));
        assert_eq!(s.rows, Some(512));
    }

    /// Offsets where a top-level element ends: a cut there leaves a shorter but
    /// well-formed data set, which the store catches by its content (missing pixel data,
    /// missing UIDs), not by its structure.
    fn top_level_boundaries(d: &[u8]) -> Vec<usize> {
        let mut out = vec![];
        let mut cut = 1;
        while cut < d.len() {
            if inspect_file(Cursor::new(d[..cut].to_vec()), 0, "1.2.840.10008.1.2.1").is_ok() {
                out.push(cut);
            }
            cut += 1;
        }
        out
    }

    #[test]
    fn every_truncation_is_detected() {
        let full = sample();
        let boundaries = top_level_boundaries(&full);
        // Seven top-level elements: only the six prefixes ending after one of the first six
        // may pass; every other cut must be reported as malformed.
        assert_eq!(boundaries.len(), 6, "{boundaries:?}");
        for cut in (1..full.len()).filter(|c| !boundaries.contains(c)) {
            let r = inspect_file(Cursor::new(full[..cut].to_vec()), 0, "1.2.840.10008.1.2.1");
            assert!(
                matches!(r, Err(InspectError::Malformed { .. })),
                "cut at {cut} of {} accepted",
                full.len()
            );
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for ts in [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.1.99",
        ] {
            let r = inspect_file(Cursor::new(garbage.clone()), 0, ts);
            assert!(
                matches!(r, Err(InspectError::Malformed { .. })),
                "{ts}: {r:?}"
            );
        }
    }

    #[test]
    fn deflated_data_set_is_walked() {
        use flate2::{write::DeflateEncoder, Compression};
        use std::io::Write;
        let mut enc = DeflateEncoder::new(Vec::new(), Compression::default());
        enc.write_all(&sample()).unwrap();
        let deflated = enc.finish().unwrap();
        let s = inspect_file(Cursor::new(deflated.clone()), 0, "1.2.840.10008.1.2.1.99")
            .expect("valid");
        assert_eq!(s.sop_instance_uid.as_deref(), Some("1.2.3.4"));
        let cut = &deflated[..deflated.len() / 2];
        assert!(inspect_file(Cursor::new(cut.to_vec()), 0, "1.2.840.10008.1.2.1.99").is_err());
    }

    /// Regression (issue #18): a deflate bomb (a few KiB announcing and holding megabytes
    /// of one value) is refused once it inflates beyond its bound.
    #[test]
    fn a_deflate_bomb_is_refused() {
        use flate2::{write::DeflateEncoder, Compression};
        use std::io::Write;
        let mut d = Vec::new();
        el_explicit(&mut d, 0x0008, 0x0060, b"CT", b"CT");
        el_explicit(&mut d, 0x0009, 0x1010, b"OB", &vec![0u8; 4 << 20]);
        let mut enc = DeflateEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(&d).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
        let ts = "1.2.840.10008.1.2.1.99";
        let err = inspect_with(Cursor::new(bomb.clone()), 0, ts, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("inflates beyond"), "{err}");
        assert!(inspect_with(Cursor::new(bomb), 0, ts, 8 << 20).is_ok());
    }

    #[test]
    fn encapsulated_pixel_data_must_be_closed() {
        let mut d = Vec::new();
        el_explicit(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
        d.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 4, 0, 0, 0, 1, 2, 3, 4]);
        let open = d.clone();
        d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        assert!(inspect_file(Cursor::new(d), 0, "1.2.840.10008.1.2.4.90").is_ok());
        assert!(inspect_file(Cursor::new(open), 0, "1.2.840.10008.1.2.4.90").is_err());
    }

    #[test]
    fn implicit_vr_sequences_are_followed() {
        let mut d = Vec::new();
        let el = |d: &mut Vec<u8>, g: u16, e: u16, v: &[u8]| {
            d.extend_from_slice(&g.to_le_bytes());
            d.extend_from_slice(&e.to_le_bytes());
            d.extend_from_slice(&(v.len() as u32).to_le_bytes());
            d.extend_from_slice(v);
        };
        el(&mut d, 0x0008, 0x0018, b"1.2.3.4\0");
        d.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        el(&mut d, 0x0008, 0x1150, b"1.2\0");
        d.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        el(&mut d, 0x0020, 0x000D, b"1.5\0");
        let s = inspect_file(Cursor::new(d), 0, "1.2.840.10008.1.2").expect("valid");
        assert_eq!(s.study_uid.as_deref(), Some("1.5"));
    }

    /// Regression (issue #18): an unknown VR is walked as dicom-parser reads it (UN, 32-bit
    /// length), so a stored file never announces to the pixel path a length it does not hold.
    #[test]
    fn an_unknown_vr_has_a_32_bit_length() {
        let mut d = Vec::new();
        el_explicit(&mut d, 0x0008, 0x0060, b"CS", b"CT");
        d.extend_from_slice(&[0x10, 0, 0x10, 0, b'P', b'J', 4, 0]);
        d.extend_from_slice(b"DOE*");
        let err = inspect_file(std::io::Cursor::new(&d), 0, "1.2.840.10008.1.2.1").unwrap_err();
        assert!(matches!(err, InspectError::Malformed { .. }), "{err}");
    }

    /// Regression (issue #18): an Implicit VR sequence of defined length is walked (it was
    /// skipped, while dicom-object parses its items when the classifier opens the file), and
    /// a binary value must hold whole values.
    #[test]
    fn implicit_defined_length_sequences_and_partial_values_are_checked() {
        let implicit = |out: &mut Vec<u8>, g: u16, e: u16, value: &[u8]| {
            out.extend_from_slice(&g.to_le_bytes());
            out.extend_from_slice(&e.to_le_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value);
        };
        // An item holding an element that announces 3 GB.
        let mut item = Vec::new();
        item.extend_from_slice(&[0x08, 0, 0x50, 0x11, 0, 0, 0, 0xC0]);
        let mut seq = Vec::new();
        implicit(&mut seq, 0xFFFE, 0xE000, &item);
        let mut d = Vec::new();
        implicit(&mut d, 0x0008, 0x0060, b"CT");
        implicit(&mut d, 0x0008, 0x1115, &seq);
        let err = inspect_file(Cursor::new(&d), 0, "1.2.840.10008.1.2").unwrap_err();
        assert!(matches!(err, InspectError::Malformed { .. }), "{err}");

        let mut d = Vec::new();
        implicit(&mut d, 0x0008, 0x0060, b"CT");
        implicit(&mut d, 0x0028, 0x0010, &[1, 0, 0]);
        let err = inspect_file(Cursor::new(&d), 0, "1.2.840.10008.1.2").unwrap_err();
        assert!(err.to_string().contains("not a multiple of 2"), "{err}");
    }
}
