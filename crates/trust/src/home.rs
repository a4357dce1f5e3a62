//! The referee home directory: key files and the trust store.
//!
//! ```text
//! HOME/                 mode 0700
//!   keys/               mode 0700
//!     publisher.key     0600  Ed25519 + ML-DSA-65 seeds
//!     publisher.pub     0644
//!     referee.key       0600  Ed25519 + X25519 identity
//!     referee.pub       0644
//!     master.key        0600  32-byte master key
//!   trust.redb          0600  trusted publishers, revocations, anti-rollback marks
//! ```
//!
//! Key files are created with `O_EXCL` under a temporary name and hard-linked into place,
//! so an existing key is never overwritten, even by two `keygen` runs racing each other.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use referee_muscle::{
    Delivery, FormatError, KeyId, MasterKey, MuscleSpec, PublisherPublicKey, PublisherSecretKey, RefereeKeys,
    RefereePublicKey, RefereeSecretKey, SealError, SealOptions, seal,
};
use zeroize::Zeroizing;

use crate::store::{TrustError, TrustStore};

/// Errors reading or writing the home directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HomeError {
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A key file is missing.
    #[error("{path} does not exist; run `referee keygen --home {home}` first")]
    MissingKey {
        /// The missing file.
        path: PathBuf,
        /// The home directory.
        home: String,
    },
    /// A key file does not parse.
    #[error("{path}: {source}")]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// A secret key file is readable by other users.
    #[error(
        "{path} has mode {mode:o}, readable by other users; run `chmod 600 {path}` (and rotate the key if it leaked)"
    )]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Key generation failed.
    #[error("key generation failed: {0}")]
    Keygen(#[from] SealError),
    /// The trust store failed.
    #[error(transparent)]
    Trust(#[from] TrustError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> HomeError + '_ {
    move |source| HomeError::Io { path: path.to_owned(), source }
}

/// What `keygen` did with one key file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyFileOutcome {
    /// A new key was generated and written.
    Created(PathBuf),
    /// A key already existed and was kept.
    Kept(PathBuf),
}

/// The result of [`Home::keygen`].
#[derive(Clone, Debug)]
pub struct KeygenReport {
    /// One outcome per secret key file.
    pub files: Vec<KeyFileOutcome>,
    /// The publisher key id.
    pub publisher: KeyId,
    /// The referee key id.
    pub referee: KeyId,
    /// The master key id.
    pub master: KeyId,
}

/// A referee home directory.
#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// A home at `root` (nothing is created until a command needs it).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The home directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }

    /// Path of the publisher secret key.
    pub fn publisher_key_path(&self) -> PathBuf {
        self.keys_dir().join("publisher.key")
    }

    /// Path of the publisher public key (give it to referees: `referee trust add`).
    pub fn publisher_pub_path(&self) -> PathBuf {
        self.keys_dir().join("publisher.pub")
    }

    /// Path of the referee identity secret key.
    pub fn referee_key_path(&self) -> PathBuf {
        self.keys_dir().join("referee.key")
    }

    /// Path of the referee public identity (give it to publishers: `--recipient`).
    pub fn referee_pub_path(&self) -> PathBuf {
        self.keys_dir().join("referee.pub")
    }

    /// Path of the master key.
    pub fn master_key_path(&self) -> PathBuf {
        self.keys_dir().join("master.key")
    }

    /// Path of the trust store.
    pub fn trust_store_path(&self) -> PathBuf {
        self.root.join("trust.redb")
    }

    /// Creates the home and keys directories (mode 0700) if missing.
    pub fn ensure_dirs(&self) -> Result<(), HomeError> {
        for dir in [self.root.clone(), self.keys_dir()] {
            DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }

    /// Creates every missing key, keeps every existing one, writes the public key files and
    /// trusts this home's own publisher key in the local trust store.
    pub fn keygen(&self) -> Result<KeygenReport, HomeError> {
        self.ensure_dirs()?;
        let files = vec![
            ensure_key(&self.publisher_key_path(), || Ok(PublisherSecretKey::generate()?.to_file()))?,
            ensure_key(&self.referee_key_path(), || Ok(RefereeSecretKey::generate()?.to_file()))?,
            ensure_key(&self.master_key_path(), || Ok(MasterKey::generate()?.to_file()))?,
        ];
        // Always reload: if another process won a race to create a key, use its key.
        let publisher = self.publisher_secret()?;
        let referee = self.referee_secret()?;
        let master = self.master_key()?;

        // Public files are derived from the secrets, so rewriting them is always safe.
        write_public(&self.publisher_pub_path(), &publisher.public_key().to_file())?;
        write_public(&self.referee_pub_path(), &referee.public_key().to_file())?;

        let publisher_public = publisher.public_key();
        let store = self.trust_store()?;
        if !store.publishers()?.iter().any(|p| p.key == publisher_public) {
            store.add_publisher(&publisher_public, "self", false)?;
        }
        Ok(KeygenReport {
            files,
            publisher: publisher_public.key_id(),
            referee: referee.key_id(),
            master: master.key_id(),
        })
    }

    fn read_secret(&self, path: &Path) -> Result<Zeroizing<String>, HomeError> {
        let file = File::open(path).map_err(|e| self.missing_or_io(path, e))?;
        let mode = file.metadata().map_err(io_err(path))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(HomeError::InsecurePermissions { path: path.to_owned(), mode: mode & 0o777 });
        }
        let mut text = Zeroizing::new(String::new());
        io::Read::read_to_string(&mut io::BufReader::new(file).take_bounded(), &mut text).map_err(io_err(path))?;
        Ok(text)
    }

    fn missing_or_io(&self, path: &Path, e: io::Error) -> HomeError {
        if e.kind() == io::ErrorKind::NotFound {
            HomeError::MissingKey { path: path.to_owned(), home: self.root.display().to_string() }
        } else {
            HomeError::Io { path: path.to_owned(), source: e }
        }
    }

    fn parse<T>(path: &Path, result: Result<T, FormatError>) -> Result<T, HomeError> {
        result.map_err(|source| HomeError::BadKeyFile { path: path.to_owned(), source })
    }

    /// Loads the publisher secret key.
    pub fn publisher_secret(&self) -> Result<PublisherSecretKey, HomeError> {
        let path = self.publisher_key_path();
        Self::parse(&path, PublisherSecretKey::from_file(&self.read_secret(&path)?))
    }

    /// Loads the referee identity.
    pub fn referee_secret(&self) -> Result<RefereeSecretKey, HomeError> {
        let path = self.referee_key_path();
        Self::parse(&path, RefereeSecretKey::from_file(&self.read_secret(&path)?))
    }

    /// Loads the master key.
    pub fn master_key(&self) -> Result<MasterKey, HomeError> {
        let path = self.master_key_path();
        Self::parse(&path, MasterKey::from_file(&self.read_secret(&path)?))
    }

    /// Loads the keys a referee opens muscles with (the master key is optional).
    pub fn referee_keys(&self) -> Result<RefereeKeys, HomeError> {
        let identity = self.referee_secret()?;
        let master = match self.master_key() {
            Ok(key) => Some(key),
            Err(HomeError::MissingKey { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(RefereeKeys { identity, master })
    }

    /// Seals `payload` with this home's publisher key for its own master key: the loop a
    /// developer (and every benchmark and test) runs against a local referee.
    pub fn seal_for_self(&self, spec: &MuscleSpec, payload: &[u8]) -> Result<Vec<u8>, HomeError> {
        let master = self.master_key()?;
        Ok(seal(spec, payload, &self.publisher_secret()?, Delivery::MasterKey(&master), SealOptions::default())?)
    }

    /// Opens (creating if needed) the trust store.
    pub fn trust_store(&self) -> Result<TrustStore, HomeError> {
        self.ensure_dirs()?;
        let path = self.trust_store_path();
        let store = TrustStore::open(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err(&path))?;
        Ok(store)
    }
}

/// Reads a publisher public key file.
pub fn read_publisher_public(path: &Path) -> Result<PublisherPublicKey, HomeError> {
    let text = read_public(path)?;
    Home::parse(path, PublisherPublicKey::from_file(&text))
}

/// Reads a referee public key file.
pub fn read_referee_public(path: &Path) -> Result<RefereePublicKey, HomeError> {
    let text = read_public(path)?;
    Home::parse(path, RefereePublicKey::from_file(&text))
}

/// Key files are a few KiB; refuse to read more than this from a path the user named.
const MAX_KEY_FILE_LEN: u64 = 64 * 1024;

trait TakeBounded: io::Read + Sized {
    fn take_bounded(self) -> io::Take<Self> {
        self.take(MAX_KEY_FILE_LEN)
    }
}

impl<R: io::Read> TakeBounded for R {}

fn read_public(path: &Path) -> Result<String, HomeError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut text = String::new();
    io::Read::read_to_string(&mut file.take_bounded(), &mut text).map_err(io_err(path))?;
    Ok(text)
}

/// Creates the key file at `path` from `make` unless it exists.
fn ensure_key(
    path: &Path,
    make: impl FnOnce() -> Result<Zeroizing<String>, SealError>,
) -> Result<KeyFileOutcome, HomeError> {
    if path.exists() {
        return Ok(KeyFileOutcome::Kept(path.to_owned()));
    }
    write_new(path, make()?.as_bytes(), 0o600)
}

/// Writes `contents` to a new file at `path` without ever replacing an existing one.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<KeyFileOutcome, HomeError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io_err(&tmp))?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match linked.and_then(|()| sync_parent(path)) {
        Ok(()) => Ok(KeyFileOutcome::Created(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(KeyFileOutcome::Kept(path.to_owned())),
        Err(e) => Err(HomeError::Io { path: path.to_owned(), source: e }),
    }
}

/// Writes a public key file atomically (temporary file, then rename).
fn write_public(path: &Path, contents: &str) -> Result<(), HomeError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file =
        OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp).map_err(io_err(&tmp))?;
    file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).and_then(|()| sync_parent(path)).map_err(io_err(path))
}

/// Syncs the directory holding `path`, so a file just linked or renamed into it survives a
/// power loss (the file's own sync does not cover its name).
fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}
