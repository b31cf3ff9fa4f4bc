//! The command line and the configuration, as an operator meets them.

mod common;

use std::process::Command;

use common::node::{Node, NodeOptions};

fn anatomy_node(args: &[&str], config: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_anatomy-node"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run anatomy-node")
}

#[test]
fn environment_variables_override_the_file() {
    let node = Node::start_with(NodeOptions {
        env: vec![("ANATOMY_DICOM__AE_TITLE".into(), "OVERRIDDEN".into())],
        ..NodeOptions::default()
    });
    assert!(node.echoscu("ECHOSCU", "OVERRIDDEN").status.success());
    assert!(!node.echoscu("ECHOSCU", "ANATOMY").status.success());
}

#[test]
fn db_migrate_creates_the_schema_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::db::TestDb::create();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}\"\n[database]\nurl = \"{}\"\n",
            dir.path().join("s").display(),
            db.url
        ),
    )
    .unwrap();
    for _ in 0..2 {
        let out = anatomy_node(&["db", "migrate"], &config);
        assert!(out.status.success(), "{}", common::text(&out));
        assert!(common::text(&out).contains("index schema is up to date"));
    }
    let url = if db.url.is_empty() {
        format!(
            "sqlite://{}?mode=ro",
            dir.path().join("s/index.sqlite3").display()
        )
    } else {
        db.url.clone()
    };
    let index = common::db::IndexReader::open(&url);
    for table in ["patients", "studies", "series", "instances", "work_queue"] {
        assert_eq!(
            index.count(&format!("SELECT COUNT(*) FROM {table}")),
            0,
            "{table} exists and is empty"
        );
    }
}

#[test]
fn a_bad_configuration_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    for (toml, expected) in [
        (
            "[dicom]\nae_title = \"THIS_TITLE_IS_TOO_LONG\"\n",
            "dicom.ae_title",
        ),
        (
            "[dicom]\nallowed_peers = \"PACS@not-an-address\"\n",
            "not-an-address",
        ),
        ("[storage]\nduplicates = \"sometimes\"\n", "sometimes"),
        ("[database]\nurl = \"mysql://x\"\n", "database.url"),
        ("[dicom]\nprot = 104\n", "prot"),
    ] {
        std::fs::write(&config, toml).unwrap();
        let out = anatomy_node(&["serve"], &config);
        let text = common::text(&out);
        assert!(!out.status.success(), "{toml} accepted");
        assert!(
            text.contains(expected),
            "{toml}: error does not name {expected:?}:\n{text}"
        );
    }
}

#[test]
fn an_unreachable_database_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}\"\n[database]\nurl = \"postgres://nobody:secret@127.0.0.1:1/none\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = anatomy_node(&["db", "migrate"], &config);
    let text = common::text(&out);
    assert!(!out.status.success());
    assert!(text.contains("connecting to the index database"), "{text}");
    assert!(
        !text.contains("secret"),
        "the password is not printed: {text}"
    );
}
