-- C-FIND support (SQLite). Keep in step with ../postgres/0003_find.sql.

-- The Anatomic Region Sequence of each series' latest label, one row per coded region, so
-- C-FIND sequence matching on Code Value / Coding Scheme Designator is an indexed lookup.
-- Written with series.predicted_body_part (index::labels::finish_job).
CREATE TABLE series_regions (
    series_ref     BIGINT NOT NULL REFERENCES series(id),
    -- head to foot, as in series_labels.anatomic_regions
    position       BIGINT NOT NULL,
    body_part      TEXT,
    code_value     TEXT NOT NULL,
    coding_scheme  TEXT NOT NULL,
    code_meaning   TEXT,
    PRIMARY KEY (series_ref, position)
);
CREATE INDEX series_regions_code ON series_regions(code_value, coding_scheme);

-- Series labelled before this migration.
INSERT INTO series_regions (series_ref, position, body_part, code_value, coding_scheme, code_meaning)
SELECT s.id, r.key,
       json_extract(r.value, '$.body_part'), json_extract(r.value, '$.code_value'),
       json_extract(r.value, '$.coding_scheme'), json_extract(r.value, '$.code_meaning')
FROM series s
JOIN series_labels l ON l.series_ref = s.id AND l.generation = s.label_generation
JOIN json_each(CASE WHEN json_valid(l.anatomic_regions) THEN l.anatomic_regions ELSE '[]' END) r
WHERE json_extract(r.value, '$.code_value') IS NOT NULL
  AND json_extract(r.value, '$.coding_scheme') IS NOT NULL;

-- Matching keys. Exact matches and wildcard prefixes (GLOB) use the BINARY indexes; Patient
-- Name is matched case-insensitively with LIKE, which uses a NOCASE index.
CREATE INDEX patients_patient_id ON patients(patient_id);
CREATE INDEX patients_name_nocase ON patients(patient_name COLLATE NOCASE);
CREATE INDEX studies_date ON studies(study_date, study_time);
CREATE INDEX studies_accession ON studies(accession_number);
CREATE INDEX series_predicted_body_part ON series(predicted_body_part);
CREATE INDEX series_received_body_part ON series(body_part_examined);
CREATE INDEX series_modality ON series(modality);
CREATE INDEX series_description ON series(series_description);
-- IMAGE level: the key-image rows of one instance in the series' latest label.
CREATE INDEX key_images_instance ON key_images(series_label_ref, sop_instance_uid);
