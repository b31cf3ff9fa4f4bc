//! One study: gather what the label sources say, retrieve and convert what got a label,
//! and commit the study's rows and state in one transaction.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use dicom_dictionary_std::tags;
use sha2::{Digest, Sha256};
use tracing::info;

use super::summary::add;
use super::{MineError, Miner, Patient};
use crate::mine::answer::Answer;
use crate::mine::labels::{self, Claim, Decision};
use crate::mine::state::MinedRow;

/// What the label sources said about a study.
struct Gathered {
    claims: Vec<Claim>,
    /// Key Object Selection and SR documents read (they are not images without a label).
    documents: usize,
    /// Sources that could not be asked: the study fails, what the others said is mined.
    failures: Vec<MineError>,
}

impl Miner {
    /// Mine one study; every outcome is recorded (a failure too, for the next run).
    pub(super) async fn study(&self, study: Answer) {
        let uid = study.text(tags::STUDY_INSTANCE_UID);
        let result = self.mine_study(&uid, &study).await;
        if let Err(e) = result {
            self.error(format!("study {uid}: {e}"));
            self.stats().studies_failed += 1;
        }
    }

    async fn mine_study(&self, uid: &str, study: &Answer) -> Result<(), MineError> {
        let predictions = self.predictions(uid).await?;
        let patient_id = study.text(tags::PATIENT_ID);
        let patient = (!patient_id.is_empty()).then(|| {
            self.keyer
                .patient(&patient_id, &study.text(tags::ISSUER_OF_PATIENT_ID))
        });
        let pseudo = self.pseudo_fingerprint(&predictions);
        let fingerprint = self.fingerprint(uid, study, patient.as_ref(), &pseudo, &BTreeSet::new());
        if self.settled_before(uid, &fingerprint).await? {
            return Ok(());
        }
        let instances = study
            .get(tags::NUMBER_OF_STUDY_RELATED_INSTANCES)
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        let Some(patient) = patient else {
            // Without a patient the split by patient is impossible: nothing is mined.
            {
                let mut stats = self.stats();
                stats.studies_without_patient_id += 1;
                stats.instances_without_label += instances;
            }
            return self.commit(uid, &fingerprint, None, Vec::new()).await;
        };

        let Gathered {
            claims,
            documents,
            mut failures,
        } = self.gather_claims(uid, study, predictions).await;
        let todo = self.decide(uid, claims, instances, documents).await?;
        let mut rows = Vec::new();
        if !todo.is_empty() {
            match self.retrieve_and_convert(uid, &patient, todo).await {
                Ok((r, failure)) => {
                    rows = r;
                    failures.extend(failure);
                }
                Err(e) => failures.push(e),
            }
        }
        let failed = failures.first().map(ToString::to_string);
        for f in &failures {
            self.error(format!("study {uid}: {f}"));
        }
        // The study as the next run will see it: RIS image rows mined before are not looked
        // for again (`locate_ris`), so the images mined now leave its fingerprint; else every
        // study labelled image by image would be looked at (and retrieved from) again once.
        let fingerprint = if rows.is_empty() {
            fingerprint
        } else {
            let mined_now: BTreeSet<&str> = rows
                .iter()
                .map(|r| r.row.sop_instance_uid.as_str())
                .collect();
            self.fingerprint(uid, study, Some(&patient), &pseudo, &mined_now)
        };
        self.commit(uid, &fingerprint, failed.as_deref(), rows)
            .await?;
        let mut stats = self.stats();
        if failed.is_some() {
            stats.studies_failed += 1;
        } else {
            stats.studies_mined += 1;
        }
        Ok(())
    }

    /// The node's own predictions for the study, when `mine.pseudo_labels` asks for them.
    async fn predictions(&self, uid: &str) -> Result<Vec<labels::Prediction>, MineError> {
        if !self.config.mine.pseudo_labels {
            return Ok(Vec::new());
        }
        labels::predictions(&self.index, uid)
            .await
            .map_err(MineError::Predictions)
    }

    /// Whether an earlier run settled the study as it is now (done, or given up after
    /// `mine.max_attempts`): then it is only counted.
    async fn settled_before(&self, uid: &str, fingerprint: &str) -> Result<bool, MineError> {
        let Some(before) = self.state.study(uid).await? else {
            return Ok(false);
        };
        if before.fingerprint != fingerprint {
            return Ok(false);
        }
        if before.state == "done" {
            self.stats().studies_unchanged += 1;
            return Ok(true);
        }
        if before.attempts >= i64::from(self.config.mine.max_attempts) {
            self.stats().studies_given_up += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// Ask every label source about the study.
    async fn gather_claims(
        &self,
        uid: &str,
        study: &Answer,
        predictions: Vec<labels::Prediction>,
    ) -> Gathered {
        let mut gathered = Gathered {
            claims: self.ris_by_study.get(uid).cloned().unwrap_or_default(),
            documents: 0,
            failures: Vec::new(),
        };
        if self.config.mine.kos || self.config.mine.sr {
            match self.document_claims(uid).await {
                Ok((claims, documents)) => {
                    gathered.claims.extend(claims);
                    gathered.documents = documents;
                }
                Err(e) => gathered.failures.push(e),
            }
        }
        match self.series_claims(uid, study).await {
            Ok(claims) => gathered.claims.extend(claims),
            Err(e) => gathered.failures.push(e),
        }
        gathered.claims.extend(self.pseudo_claims(predictions));
        gathered
    }

    /// Resolve the claims into labels and count them: the decisions not mined before.
    async fn decide(
        &self,
        uid: &str,
        claims: Vec<Claim>,
        instances: usize,
        documents: usize,
    ) -> Result<Vec<Decision>, MineError> {
        let (decisions, unlabelled) = labels::resolve(claims);
        let mined = self.state.mined_in_study(uid).await?;
        let (todo, done): (Vec<Decision>, Vec<Decision>) = decisions
            .into_iter()
            .partition(|d| !mined.contains(&(d.sop_instance_uid.clone(), d.frame)));
        let labelled: BTreeSet<&str> = todo
            .iter()
            .chain(&done)
            .map(|d| d.sop_instance_uid.as_str())
            .collect();
        let mut stats = self.stats();
        for (reason, n) in unlabelled {
            add(&mut stats.unlabelled, reason, n);
        }
        stats.already_mined += done.len();
        stats.instances_without_label += instances.saturating_sub(documents + labelled.len());
        drop(stats);
        Ok(todo)
    }

    async fn commit(
        &self,
        uid: &str,
        fingerprint: &str,
        failed: Option<&str>,
        rows: Vec<MinedRow>,
    ) -> Result<(), MineError> {
        let started = Instant::now();
        let added = self
            .state
            .commit_study(self.run_id, uid, fingerprint, failed, &rows)
            .await
            .map_err(MineError::Commit)?;
        self.commit_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let mut stats = self.stats();
        stats.rows_added += added;
        for r in &rows {
            add(&mut stats.added_by_source, r.row.label_source.clone(), 1);
            add(&mut stats.added_by_label, r.row.label.clone(), 1);
            add(&mut stats.added_by_split, r.row.split.clone(), 1);
        }
        if !rows.is_empty() {
            info!(study = uid, rows = added, "study mined");
        }
        Ok(())
    }

    /// The study as this run sees it: a change in any part makes the next run look again.
    /// `pseudo` is [`Self::pseudo_fingerprint`] of its predictions; RIS image rows of
    /// `mined_now` are left out, as the next run leaves out the rows mined before.
    fn fingerprint(
        &self,
        uid: &str,
        study: &Answer,
        patient: Option<&Patient>,
        pseudo: &[String],
        mined_now: &BTreeSet<&str>,
    ) -> String {
        // The patient enters as its keyed key: the index never holds an unkeyed hash of
        // a Patient ID, which a dictionary of IDs would reverse.
        let parts = [
            self.rules_hash.clone(),
            study.text(tags::NUMBER_OF_STUDY_RELATED_INSTANCES),
            study.text(tags::NUMBER_OF_STUDY_RELATED_SERIES),
            study.text(tags::ACCESSION_NUMBER),
            patient.map(|p| p.0.clone()).unwrap_or_default(),
            sha(&self.ris_fingerprint(uid, study, mined_now).join(",")),
            sha(&pseudo.join(",")),
        ];
        sha(&parts.join("|"))
    }

    /// Every RIS row that concerns the study, in a stable order (image rows not mined
    /// before this run, less those of `mined_now`).
    fn ris_fingerprint(
        &self,
        uid: &str,
        study: &Answer,
        mined_now: &BTreeSet<&str>,
    ) -> Vec<String> {
        let mut ris: Vec<String> = self
            .ris_by_study
            .get(uid)
            .map(|c| {
                c.iter()
                    .filter(|c| !mined_now.contains(c.sop_instance_uid.as_str()))
                    .map(|c| format!("{}={:?}", c.sop_instance_uid, c.label))
                    .collect()
            })
            .unwrap_or_default();
        ris.extend(
            self.ris
                .series
                .iter()
                .filter(|((st, _), _)| st == uid)
                .map(|((_, se), l)| format!("{se}={l:?}")),
        );
        if let Some(label) = self.ris.accessions.get(&study.text(tags::ACCESSION_NUMBER)) {
            ris.push(format!("accession={label:?}"));
        }
        ris.sort();
        ris
    }

    /// The predictions that count as pseudo labels (the others never change the study).
    fn pseudo_fingerprint(&self, predictions: &[labels::Prediction]) -> Vec<String> {
        let mine = &self.config.mine;
        predictions
            .iter()
            .filter(|p| {
                p.pseudo_check(
                    mine.pseudo_label_min_probability,
                    mine.pseudo_label_require_order,
                ) == labels::PseudoCheck::Keep
            })
            .map(|p| {
                format!(
                    "{}:{}:{}:{}",
                    p.sop_instance_uid, p.frame, p.label, p.model_version
                )
            })
            .collect()
    }
}

fn sha(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..12])
}
