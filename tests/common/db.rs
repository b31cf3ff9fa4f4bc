//! The index database of a test: SQLite in the node's storage directory by default, or a
//! fresh PostgreSQL database per test when ANATOMY_TEST_DATABASE_URL names a server
//! (`postgres://user@127.0.0.1:5432/postgres`, the maintenance database to create from).

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::{AnyPool, Row};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct TestDb {
    /// The URL the node is configured with ("" = SQLite in its storage directory).
    pub url: String,
    admin: Option<(String, String)>,
}

pub fn postgres_admin_url() -> Option<String> {
    std::env::var("ANATOMY_TEST_DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"))
}

impl TestDb {
    pub fn create() -> TestDb {
        let Some(admin) = postgres_admin_url() else {
            return TestDb {
                url: String::new(),
                admin: None,
            };
        };
        TestDb::create_on(admin)
    }

    /// A fresh database on the PostgreSQL server whose maintenance database is `admin`.
    pub fn create_on(admin: String) -> TestDb {
        let name = format!(
            "anatomy_test_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        super::runtime().block_on(async {
            sqlx::any::install_default_drivers();
            let pool = AnyPool::connect(&admin)
                .await
                .expect("connect to PostgreSQL admin URL");
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(&pool)
                .await
                .expect("drop old test database");
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&pool)
                .await
                .expect("create test database");
            pool.close().await;
        });
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_string())
            .unwrap_or(admin.clone());
        TestDb {
            url: format!("{base}/{name}"),
            admin: Some((admin, name)),
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.admin.is_some()
    }

    /// The URL a test reads the index with: this database, or the read-only SQLite file
    /// of a node (or `mine`) whose storage directory is `storage`.
    pub fn reader_url(&self, storage: &std::path::Path) -> String {
        if self.url.is_empty() {
            format!(
                "sqlite://{}?mode=ro",
                storage.join("index.sqlite3").display()
            )
        } else {
            self.url.clone()
        }
    }

    pub fn label(&self) -> &'static str {
        if self.is_postgres() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.admin.take() {
            let _ = super::runtime().block_on(async {
                let pool = AnyPool::connect(&admin).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&pool)
                    .await?;
                pool.close().await;
                Ok::<_, sqlx::Error>(())
            });
        }
    }
}

/// Read-only queries against a node's index, from the test.
pub struct IndexReader {
    rt: tokio::runtime::Runtime,
    pool: AnyPool,
}

impl IndexReader {
    pub fn open(url: &str) -> IndexReader {
        let rt = super::runtime();
        let pool = rt.block_on(async {
            sqlx::any::install_default_drivers();
            AnyPool::connect(url).await.expect("open the node's index")
        });
        IndexReader { rt, pool }
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.rt.block_on(async {
            sqlx::query(sql)
                .fetch_one(&self.pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .get::<i64, _>(0)
        })
    }

    /// Rows of text columns (NULL as "").
    pub fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        self.rt.block_on(async {
            let rows = sqlx::query(sql)
                .fetch_all(&self.pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| {
                            r.try_get::<Option<String>, _>(i)
                                .map(|v| v.unwrap_or_default())
                                .or_else(|_| {
                                    r.try_get::<Option<i64>, _>(i)
                                        .map(|v| v.map(|n| n.to_string()).unwrap_or_default())
                                })
                                .unwrap_or_default()
                        })
                        .collect()
                })
                .collect()
        })
    }
}

impl Drop for IndexReader {
    fn drop(&mut self) {
        let pool = self.pool.clone();
        self.rt.block_on(async move { pool.close().await });
    }
}
