//! Destinations and routes: the `[[destinations]]` and `[[routes]]` tables of config.toml,
//! their validation at start-up (every error names its key), and the matching of a labelled
//! series (and each of its instances) against the routes.
//!
//! A route matches when every criterion it sets holds; within a list, any value matches:
//! `classes` (a class of the series' coverage whose confidence is at least
//! `min_probability`), `body_parts` (the series' Body Part Examined term or the term of one of
//! its regions), `modalities` (the series' Modality), `calling_ae_titles` (the AE title that
//! sent the instance). Only labelled series are routed.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::anatomy::coverage;

/// Where tagged copies are sent: a C-STORE SCP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// The name routes use.
    pub name: String,
    /// The destination's AE title (the called AE title).
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    /// Our AE title on these associations; default `dicom.ae_title`.
    #[serde(default)]
    pub calling_ae_title: Option<String>,
    /// `[destinations.tls]`: DICOM TLS to this destination.
    #[serde(default)]
    pub tls: crate::net::ClientTlsConfig,
}

/// Which labelled series go where.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A name for logs, `forward status` and the outbox (default `routes[N]`).
    #[serde(default)]
    pub name: Option<String>,
    /// Any of these classes in the series' coverage (the model's class names).
    #[serde(default)]
    pub classes: Vec<String>,
    /// The least confidence of a class in `classes`: the mean probability of the class over
    /// the key-images it labels (decoded along z). Needs `classes`.
    #[serde(default)]
    pub min_probability: Option<f64>,
    /// Any of these Body Part Examined terms: the series' term or one of its regions'.
    #[serde(default)]
    pub body_parts: Vec<String>,
    /// Any of these modalities (series Modality, e.g. "CT").
    #[serde(default)]
    pub modalities: Vec<String>,
    /// Only instances sent to the node by one of these AE titles.
    #[serde(default)]
    pub calling_ae_titles: Vec<String>,
    /// Names of `[[destinations]]`.
    pub destinations: Vec<String>,
}

/// The Body Part Examined terms this node writes (anatomy::coverage, PS3.16 Table L-1).
pub const BODY_PART_TERMS: &[&str] = &[
    coverage::NECK.body_part,
    coverage::CHEST.body_part,
    coverage::ABDOMEN.body_part,
    coverage::PELVIS.body_part,
    coverage::LOWER_LIMB.body_part,
    coverage::NECK_CHEST.body_part,
    coverage::NECK_CHEST_ABDOMEN.body_part,
    coverage::NECK_CHEST_ABDOMEN_PELVIS.body_part,
    coverage::CHEST_ABDOMEN.body_part,
    coverage::CHEST_ABDOMEN_PELVIS.body_part,
    coverage::ABDOMEN_PELVIS.body_part,
    coverage::PELVIS_LOWER_LIMBS.body_part,
];

/// Check destinations and routes; the error names the key (`destinations[1].port`).
pub fn validate(destinations: &[DestinationConfig], routes: &[RouteConfig]) -> Result<(), String> {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, d) in destinations.iter().enumerate() {
        let key = format!("destinations[{i}]");
        if d.name.trim().is_empty() {
            return Err(format!("{key}.name must not be empty"));
        }
        if let Some(first) = names.insert(d.name.as_str(), i) {
            return Err(format!(
                "{key}.name {:?} is already the name of destinations[{first}]",
                d.name
            ));
        }
        check_ae(&format!("{key}.ae_title"), &d.ae_title)?;
        if let Some(calling) = &d.calling_ae_title {
            check_ae(&format!("{key}.calling_ae_title"), calling)?;
        }
        if d.host.trim().is_empty() {
            return Err(format!("{key}.host must not be empty"));
        }
        if d.port == 0 {
            return Err(format!("{key}.port must be between 1 and 65535"));
        }
        d.tls.check(&key)?;
    }
    let known = || {
        if names.is_empty() {
            "no [[destinations]] are configured".to_string()
        } else {
            format!(
                "destinations: {}",
                names.keys().copied().collect::<Vec<_>>().join(", ")
            )
        }
    };
    for (i, r) in routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        if r.destinations.is_empty() {
            return Err(format!(
                "{key}.destinations must name at least one destination"
            ));
        }
        for d in &r.destinations {
            if !names.contains_key(d.as_str()) {
                return Err(format!(
                    "{key}.destinations: {d:?} is not the name of a destination ({})",
                    known()
                ));
            }
        }
        if let Some(p) = r.min_probability {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!(
                    "{key}.min_probability must be between 0 and 1, not {p}"
                ));
            }
            if r.classes.is_empty() {
                return Err(format!(
                    "{key}.min_probability applies to {key}.classes, which is empty"
                ));
            }
        }
        if let Some(blank) = r.classes.iter().find(|c| c.trim().is_empty()) {
            return Err(format!("{key}.classes: {blank:?} is not a class name"));
        }
        for part in &r.body_parts {
            if !BODY_PART_TERMS.iter().any(|t| t.eq_ignore_ascii_case(part)) {
                return Err(format!(
                    "{key}.body_parts: {part:?} is not a Body Part Examined term this node writes ({})",
                    BODY_PART_TERMS.join(", ")
                ));
            }
        }
        for m in &r.modalities {
            if m.trim().is_empty() || m.len() > 16 {
                return Err(format!("{key}.modalities: {m:?} is not a modality"));
            }
        }
        for ae in &r.calling_ae_titles {
            check_ae(&format!("{key}.calling_ae_titles"), ae)?;
        }
    }
    Ok(())
}

fn check_ae(key: &str, ae: &str) -> Result<(), String> {
    let ok = !ae.trim().is_empty()
        && ae.len() <= 16
        && ae
            .chars()
            .all(|c| c.is_ascii() && !c.is_ascii_control() && c != '\\');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key}: AE title {ae:?} must be 1-16 printable ASCII characters without backslash"
        ))
    }
}

/// What routes look at in a labelled series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeriesFacts {
    pub modality: Option<String>,
    /// The predicted Body Part Examined term of the whole series.
    pub body_part: Option<String>,
    /// The Body Part Examined terms of its regions (head to foot).
    pub region_terms: Vec<String>,
    /// The classes of its coverage and their confidence (see [`RouteConfig::min_probability`]).
    pub class_confidence: Vec<(String, f64)>,
}

/// A route, ready to match.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub config: RouteConfig,
}

impl Route {
    pub fn all(routes: &[RouteConfig]) -> Vec<Route> {
        routes
            .iter()
            .enumerate()
            .map(|(i, r)| Route {
                name: r
                    .name
                    .clone()
                    .filter(|n| !n.trim().is_empty())
                    .unwrap_or_else(|| format!("routes[{i}]")),
                config: r.clone(),
            })
            .collect()
    }

    /// Whether the series-level criteria hold.
    pub fn matches_series(&self, facts: &SeriesFacts) -> bool {
        let r = &self.config;
        let min = r.min_probability.unwrap_or(0.0);
        let classes = r.classes.is_empty()
            || facts.class_confidence.iter().any(|(class, confidence)| {
                *confidence >= min && r.classes.iter().any(|c| c.eq_ignore_ascii_case(class))
            });
        let body_parts = r.body_parts.is_empty()
            || r.body_parts.iter().any(|wanted| {
                facts
                    .body_part
                    .iter()
                    .chain(&facts.region_terms)
                    .any(|term| term.eq_ignore_ascii_case(wanted))
            });
        let modalities = r.modalities.is_empty()
            || facts.modality.as_deref().is_some_and(|m| {
                r.modalities
                    .iter()
                    .any(|w| w.eq_ignore_ascii_case(m.trim()))
            });
        classes && body_parts && modalities
    }

    /// Whether an instance sent by `calling_ae` goes along.
    pub fn matches_instance(&self, calling_ae: &str) -> bool {
        let wanted = &self.config.calling_ae_titles;
        wanted.is_empty() || wanted.iter().any(|ae| ae.trim() == calling_ae.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(name: &str) -> DestinationConfig {
        DestinationConfig {
            name: name.into(),
            ae_title: name.into(),
            host: "127.0.0.1".into(),
            port: 11113,
            calling_ae_title: None,
            tls: Default::default(),
        }
    }

    fn route(classes: &[&str], destinations: &[&str]) -> RouteConfig {
        RouteConfig {
            name: None,
            classes: classes.iter().map(|s| s.to_string()).collect(),
            min_probability: None,
            body_parts: Vec::new(),
            modalities: Vec::new(),
            calling_ae_titles: Vec::new(),
            destinations: destinations.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn chest() -> SeriesFacts {
        SeriesFacts {
            modality: Some("CT".into()),
            body_part: Some("CHESTABDOMEN".into()),
            region_terms: vec!["CHEST".into(), "ABDOMEN".into()],
            class_confidence: vec![("lungs".into(), 0.8), ("liver".into(), 0.45)],
        }
    }

    #[test]
    fn errors_name_the_key() {
        let d = [dest("LUNG_CAD")];
        let err = validate(&d, &[route(&["lungs"], &["LIVER_CAD"])]).unwrap_err();
        assert!(
            err.starts_with("routes[0].destinations: \"LIVER_CAD\""),
            "{err}"
        );
        assert!(err.contains("LUNG_CAD"), "{err}");

        let mut r = route(&["lungs"], &["LUNG_CAD"]);
        r.min_probability = Some(1.5);
        let err = validate(&d, &[r]).unwrap_err();
        assert!(err.starts_with("routes[0].min_probability"), "{err}");

        let mut r = route(&[], &["LUNG_CAD"]);
        r.min_probability = Some(0.5);
        assert!(validate(&d, &[r])
            .unwrap_err()
            .contains("routes[0].classes"));

        let mut r = route(&[], &["LUNG_CAD"]);
        r.body_parts = vec!["THORAX".into()];
        assert!(validate(&d, &[r])
            .unwrap_err()
            .starts_with("routes[0].body_parts: \"THORAX\""));

        let err = validate(&[dest("A"), dest("A")], &[]).unwrap_err();
        assert!(err.starts_with("destinations[1].name"), "{err}");

        let mut bad = dest("B");
        bad.ae_title = "A_TITLE_FAR_TOO_LONG".into();
        assert!(validate(&[bad], &[])
            .unwrap_err()
            .starts_with("destinations[0].ae_title"));
        assert!(validate(&[], &[route(&[], &[])])
            .unwrap_err()
            .starts_with("routes[0].destinations"));
        assert!(validate(&d, &[route(&["lungs"], &["LUNG_CAD"])]).is_ok());
    }

    #[test]
    fn classes_match_with_their_confidence() {
        let routes = Route::all(&[
            route(&["lungs"], &["A"]),
            RouteConfig {
                min_probability: Some(0.5),
                ..route(&["liver"], &["A"])
            },
            RouteConfig {
                min_probability: Some(0.4),
                ..route(&["LIVER"], &["A"])
            },
            route(&["pelvis"], &["A"]),
        ]);
        let hits: Vec<bool> = routes.iter().map(|r| r.matches_series(&chest())).collect();
        assert_eq!(hits, [true, false, true, false]);
        assert_eq!(routes[0].name, "routes[0]");
    }

    #[test]
    fn body_parts_modalities_and_calling_titles() {
        let mut r = route(&[], &["A"]);
        r.body_parts = vec!["chest".into()];
        let by_region = Route::all(&[r.clone()]).remove(0);
        assert!(
            by_region.matches_series(&chest()),
            "a region's term matches"
        );
        r.body_parts = vec!["PELVIS".into()];
        assert!(!Route::all(&[r.clone()])[0].matches_series(&chest()));
        r.body_parts = vec!["CHESTABDOMEN".into()];
        r.modalities = vec!["MR".into()];
        assert!(!Route::all(&[r.clone()])[0].matches_series(&chest()));
        r.modalities = vec!["ct".into()];
        r.calling_ae_titles = vec!["CT1".into()];
        let route = Route::all(&[r])[0].clone();
        assert!(route.matches_series(&chest()));
        assert!(route.matches_instance("CT1"));
        assert!(!route.matches_instance("CT2"));
        assert!(
            Route::all(&[route_with_nothing()])[0].matches_series(&SeriesFacts::default()),
            "a route without criteria takes every labelled series"
        );
    }

    fn route_with_nothing() -> RouteConfig {
        route(&[], &["A"])
    }
}
