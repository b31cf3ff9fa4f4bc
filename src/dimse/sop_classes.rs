//! What this node accepts in association negotiation: the storage SOP classes a CT
//! workflow sends (all stored; only CT is classified later), the query models it answers
//! (C-FIND) and the transfer syntaxes it stores byte for byte.

use dicom_dictionary_std::uids;

pub const VERIFICATION: &str = uids::VERIFICATION;

/// Query/Retrieve Information Models – FIND accepted as SCP (`dimse::find`).
pub const PATIENT_ROOT_QR_FIND: &str = uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND;
pub const STUDY_ROOT_QR_FIND: &str = uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND;
pub const QUERY_SOP_CLASSES: &[&str] = &[PATIENT_ROOT_QR_FIND, STUDY_ROOT_QR_FIND];

/// Storage SOP classes accepted as SCP.
pub const STORAGE_SOP_CLASSES: &[&str] = &[
    // CT images, the classified ones
    uids::CT_IMAGE_STORAGE,
    uids::ENHANCED_CT_IMAGE_STORAGE,
    uids::LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    uids::CT_IMAGE_STORAGE_FOR_PROCESSING,
    uids::ENHANCED_CT_IMAGE_STORAGE_FOR_PROCESSING,
    // what travels with CT studies
    uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_SINGLE_BIT_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_GRAYSCALE_BYTE_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_GRAYSCALE_WORD_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_TRUE_COLOR_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE,
    uids::GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE,
    uids::X_RAY_RADIATION_DOSE_SR_STORAGE,
    uids::ENHANCED_X_RAY_RADIATION_DOSE_SR_STORAGE,
    uids::BASIC_TEXT_SR_STORAGE,
    uids::ENHANCED_SR_STORAGE,
    uids::COMPREHENSIVE_SR_STORAGE,
    uids::ENCAPSULATED_PDF_STORAGE,
    uids::CT_PERFORMED_PROCEDURE_PROTOCOL_STORAGE,
    uids::RAW_DATA_STORAGE,
    uids::SPATIAL_REGISTRATION_STORAGE,
    uids::DEFORMABLE_SPATIAL_REGISTRATION_STORAGE,
    uids::SEGMENTATION_STORAGE,
    // PET/CT and radiotherapy planning CT
    uids::POSITRON_EMISSION_TOMOGRAPHY_IMAGE_STORAGE,
    uids::ENHANCED_PET_IMAGE_STORAGE,
    uids::RT_STRUCTURE_SET_STORAGE,
    uids::RT_PLAN_STORAGE,
    uids::RT_DOSE_STORAGE,
];

/// Transfer syntaxes accepted, in the order a proposal is matched against.
pub const TRANSFER_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2.1",    // Explicit VR Little Endian
    "1.2.840.10008.1.2",      // Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99", // Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50", // JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51", // JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57", // JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70", // JPEG Lossless, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.80", // JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81", // JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90", // JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91", // JPEG 2000
    "1.2.840.10008.1.2.5",    // RLE Lossless
];

pub fn is_storage_class(uid: &str) -> bool {
    STORAGE_SOP_CLASSES.contains(&uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transfer_syntax_is_known_to_dicom_ul() {
        // dicom-ul accepts a transfer syntax only when the registry can read its data sets.
        for ts in TRANSFER_SYNTAXES {
            assert!(
                dicom_ul::association::server::is_supported(ts),
                "{ts} unsupported"
            );
        }
    }
}
