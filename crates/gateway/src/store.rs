//! `gateway.redb` in the home: issued tokens (metadata only, never the token) and revocations.
//! Separate from the runtime's `state.redb`, which the runtime keeps locked.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const REVOKED: TableDefinition<&str, u64> = TableDefinition::new("revoked");

/// File name of the gateway store in the home.
pub const STORE_FILE: &str = "gateway.redb";

/// Errors of the gateway store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed; `locked` hints that a running server holds it.
    #[error("gateway store {what}: {why}")]
    Db {
        /// The operation.
        what: &'static str,
        /// The database's message, with a hint.
        why: String,
    },
    /// A record does not decode.
    #[error("gateway store: corrupt token record {0}")]
    Corrupt(String),
}

/// Adds the operation name (and a hint when a server holds the lock) to redb errors.
trait Ctx<T> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| db_err(what, e.into()))
    }
}

fn db_err(what: &'static str, e: redb::Error) -> StoreError {
    {
        let hint = if matches!(e, redb::Error::DatabaseAlreadyOpen) {
            " (a running `referee serve` holds it; the CLI talks to the server over its Unix socket)"
        } else {
            ""
        };
        StoreError::Db { what, why: format!("{e}{hint}") }
    }
}

/// What the store keeps about an issued token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenRecord {
    /// Revocation id of the token's first block.
    pub id: String,
    /// Label given at creation.
    pub label: String,
    /// Granted tools (`*`: all).
    pub tools: Vec<String>,
    /// Granted muscles (`*`: all).
    pub muscles: Vec<String>,
    /// Granted path prefixes (`*`: every root).
    pub paths: Vec<String>,
    /// Granted worknode subtrees (`*`: the whole tree); absent in records written before
    /// worknode rights existed.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Admin token.
    pub admin: bool,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds, if it expires.
    pub expires_at: Option<u64>,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// The gateway's own embedded store.
pub struct GatewayStore {
    db: Database,
}

impl std::fmt::Debug for GatewayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayStore").finish_non_exhaustive()
    }
}

impl GatewayStore {
    /// Opens (creating, mode 0600) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).ctx("open")?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::Db { what: "chmod", why: e.to_string() })?;
        let txn = db.begin_write().ctx("initialise")?;
        {
            txn.open_table(TOKENS).ctx("initialise")?;
            txn.open_table(REVOKED).ctx("initialise")?;
        }
        txn.commit().ctx("initialise")?;
        Ok(Self { db })
    }

    /// Records an issued token.
    pub fn record(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let txn = self.db.begin_write().ctx("write")?;
        {
            let mut table = txn.open_table(TOKENS).ctx("write")?;
            table.insert(record.id.as_str(), bytes.as_slice()).ctx("write")?;
        }
        txn.commit().ctx("write")
    }

    /// Marks a revocation id as revoked.
    pub fn revoke(&self, id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().ctx("write")?;
        {
            let mut table = txn.open_table(REVOKED).ctx("write")?;
            table.insert(id, crate::auth::now_unix()).ctx("write")?;
        }
        txn.commit().ctx("write")
    }

    /// Every revoked id.
    pub fn revoked(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read().ctx("read")?;
        let table = txn.open_table(REVOKED).ctx("read")?;
        let rows = table.iter().ctx("read")?;
        rows.map(|row| row.map(|(k, _)| k.value().to_owned()).ctx("read")).collect()
    }

    /// Every issued token, with its revocation state.
    pub fn list(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let revoked = self.revoked()?;
        let txn = self.db.begin_read().ctx("read")?;
        let table = txn.open_table(TOKENS).ctx("read")?;
        let rows = table.iter().ctx("read")?;
        rows.map(|row| {
            let (k, v) = row.ctx("read")?;
            let mut record: TokenRecord =
                serde_json::from_slice(v.value()).map_err(|_| StoreError::Corrupt(k.value().to_owned()))?;
            record.revoked = revoked.contains(&record.id);
            Ok(record)
        })
        .collect()
    }
}
