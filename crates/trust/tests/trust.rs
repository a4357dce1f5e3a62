//! The home directory and the redb trust store against the real file system.

use std::os::unix::fs::PermissionsExt;

use referee_muscle::{ABI_V1, Delivery, Limits, MuscleSpec, OpenError, SealOptions, SealedMuscle, open, seal};
use referee_trust::{Home, HomeError, KeyFileOutcome, Revocation, TrustStore};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn spec(version: u64) -> MuscleSpec {
    MuscleSpec {
        name: "feanor".into(),
        muscle_id: None,
        version,
        created_at: 0,
        binding: None,
        abi: ABI_V1.into(),
        capabilities: vec![],
        limits: Limits::default(),
        inputs: vec![],
        outputs: vec![],
        extensions: vec![],
    }
}

#[test]
fn keygen_creates_owner_only_keys_and_never_overwrites() -> TestResult {
    let dir = tempfile::tempdir()?;
    let home = Home::new(dir.path().join("home"));
    let first = home.keygen()?;
    assert!(first.files.iter().all(|f| matches!(f, KeyFileOutcome::Created(_))));
    for path in [home.publisher_key_path(), home.referee_key_path(), home.master_key_path(), home.trust_store_path()] {
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    assert_eq!(std::fs::metadata(home.root())?.permissions().mode() & 0o777, 0o700);
    let before = std::fs::read(home.master_key_path())?;

    let second = home.keygen()?;
    assert!(second.files.iter().all(|f| matches!(f, KeyFileOutcome::Kept(_))));
    assert_eq!(std::fs::read(home.master_key_path())?, before);
    assert_eq!((first.publisher, first.referee, first.master), (second.publisher, second.referee, second.master));
    // keygen trusts its own publisher key once.
    assert_eq!(home.trust_store()?.publishers()?.len(), 1);
    Ok(())
}

#[test]
fn secret_keys_readable_by_others_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let home = Home::new(dir.path());
    home.keygen()?;
    std::fs::set_permissions(home.master_key_path(), std::fs::Permissions::from_mode(0o644))?;
    assert!(matches!(home.master_key(), Err(HomeError::InsecurePermissions { mode: 0o644, .. })));
    Ok(())
}

#[test]
fn missing_keys_say_how_to_create_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let err = Home::new(dir.path()).publisher_secret().err().ok_or("expected an error")?;
    assert!(err.to_string().contains("referee keygen"), "{err}");
    Ok(())
}

#[test]
fn store_survives_reopen_and_drives_the_open_pipeline() -> TestResult {
    let dir = tempfile::tempdir()?;
    let home = Home::new(dir.path());
    home.keygen()?;
    let publisher = home.publisher_secret()?;
    let keys = home.referee_keys()?;
    let master = keys.master.as_ref().ok_or("no master key")?;
    let v1 = seal(&spec(1), b"one", &publisher, Delivery::MasterKey(master), SealOptions::default())?;
    let v2 = seal(&spec(2), b"two", &publisher, Delivery::MasterKey(master), SealOptions::default())?;

    {
        let store = home.trust_store()?;
        let opened = open(&v2, &keys, &store)?;
        assert_eq!(store.record_accepted(&opened.header)?, 2);
        // Recording a lower version never lowers the mark.
        assert_eq!(store.record_accepted(&SealedMuscle::parse(&v1)?.header)?, 2);
    }
    let store = TrustStore::open(&home.trust_store_path())?;
    assert!(matches!(open(&v1, &keys, &store), Err(OpenError::Rollback { version: 1, highest: 2, .. })));
    let id = publisher.public_key().key_id();
    assert_eq!(store.allow_rollback(&id, "feanor", 1)?, Some(2));
    let opened = open(&v1, &keys, &store)?;
    assert_eq!(opened.payload.as_slice(), b"one");

    store.revoke(Revocation::MuscleVersion(opened.header.muscle_id, 1), "bad weights")?;
    assert!(matches!(open(&v1, &keys, &store), Err(OpenError::VersionRevoked { .. })));
    open(&v2, &keys, &store)?;
    store.revoke(Revocation::Publisher(id), "key leaked")?;
    assert!(matches!(open(&v2, &keys, &store), Err(OpenError::PublisherRevoked { .. })));
    let revocations = store.revocations()?;
    assert_eq!(revocations.len(), 2);
    assert!(revocations.iter().any(|r| r.reason == "key leaked"));

    assert!(store.remove_publisher(&id)?);
    assert!(matches!(open(&v2, &keys, &store), Err(OpenError::UntrustedPublisher { .. })));
    Ok(())
}
