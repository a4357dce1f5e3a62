//! Seal/open round trips, every refusal of the open pipeline, and exhaustive tampering.

use referee_muscle::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

struct World {
    publisher: PublisherSecretKey,
    referee: RefereeKeys,
    trust: MemoryTrust,
}

impl World {
    fn new() -> Result<Self, SealError> {
        let publisher = PublisherSecretKey::generate()?;
        let referee = RefereeKeys { identity: RefereeSecretKey::generate()?, master: Some(MasterKey::generate()?) };
        let mut trust = MemoryTrust::default();
        trust.trust(publisher.public_key());
        Ok(Self { publisher, referee, trust })
    }

    fn seal(
        &self,
        spec: &MuscleSpec,
        payload: &[u8],
        master_mode: bool,
        options: SealOptions,
    ) -> Result<Vec<u8>, SealError> {
        let recipients = [self.referee.identity.public_key()];
        let delivery = match (&self.referee.master, master_mode) {
            (Some(master), true) => Delivery::MasterKey(master),
            _ => Delivery::Recipients(&recipients),
        };
        seal(spec, payload, &self.publisher, delivery, options)
    }

    fn open(&self, blob: &[u8]) -> Result<OpenedMuscle, OpenError> {
        open(blob, &self.referee, &self.trust)
    }
}

fn spec(name: &str, version: u64) -> MuscleSpec {
    MuscleSpec {
        name: name.into(),
        muscle_id: None,
        version,
        created_at: 1_763_000_000,
        binding: None,
        abi: ABI_V1.into(),
        capabilities: vec!["log".into(), "clock_now".into()],
        limits: Limits { memory_bytes: 1 << 20, time_ms: 50, fuel: 0 },
        inputs: vec![TensorSpec { name: "x".into(), dtype: DType::F32, dims: vec![1, 4] }],
        outputs: vec![TensorSpec { name: "y".into(), dtype: DType::F32, dims: vec![1, 1] }],
        extensions: vec![],
    }
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn round_trip_every_suite_mode_and_signature_scheme() -> TestResult {
    let world = World::new()?;
    let body = payload(3000);
    for suite in Suite::ALL {
        for master_mode in [true, false] {
            for post_quantum in [false, true] {
                let blob =
                    world.seal(&spec("feanor", 1), &body, master_mode, SealOptions { suite: *suite, post_quantum })?;
                let opened = world.open(&blob)?;
                assert_eq!(opened.payload.as_slice(), body.as_slice());
                assert_eq!(opened.header.suite, *suite);
                let expected_mode = if master_mode { KeyMode::MasterKey } else { KeyMode::Recipients };
                assert_eq!(opened.header.key_mode, expected_mode);
                let expected_scheme =
                    if post_quantum { SignatureScheme::Ed25519MlDsa65 } else { SignatureScheme::Ed25519 };
                assert_eq!(opened.header.signature_scheme, expected_scheme);
                // Capabilities were given unsorted; the header holds them canonically.
                assert_eq!(opened.header.capabilities, vec!["clock_now".to_owned(), "log".to_owned()]);
            }
        }
    }
    Ok(())
}

#[test]
fn empty_payload_round_trips() -> TestResult {
    let world = World::new()?;
    let blob = world.seal(&spec("empty", 1), &[], false, SealOptions::default())?;
    assert!(world.open(&blob)?.payload.is_empty());
    Ok(())
}

#[test]
fn sealing_twice_gives_different_bytes_with_the_same_payload() -> TestResult {
    let world = World::new()?;
    let a = world.seal(&spec("feanor", 1), b"weights", true, SealOptions::default())?;
    let b = world.seal(&spec("feanor", 1), b"weights", true, SealOptions::default())?;
    assert_ne!(a, b, "content key and nonce must be fresh per muscle");
    assert_eq!(world.open(&a)?.payload.as_slice(), world.open(&b)?.payload.as_slice());
    Ok(())
}

/// Flip two different bits of every byte and cut the blob at every length: all refused.
fn assert_every_mutation_refused(world: &World, blob: &[u8]) {
    for i in 0..blob.len() {
        for bit in [0x01u8, 0x80] {
            let mut variant = blob.to_vec();
            if let Some(b) = variant.get_mut(i) {
                *b ^= bit;
            }
            assert!(world.open(&variant).is_err(), "flip {bit:#04x} at byte {i} of {} was accepted", blob.len());
        }
    }
    for len in 0..blob.len() {
        assert!(world.open(blob.get(..len).unwrap_or_default()).is_err(), "truncation to {len} bytes accepted");
    }
    let mut longer = blob.to_vec();
    longer.push(0);
    assert!(matches!(world.open(&longer), Err(OpenError::Malformed(FormatError::TrailingBytes { extra: 1 }))));
}

#[test]
fn every_byte_flip_and_truncation_is_refused_master_key_mode() -> TestResult {
    let world = World::new()?;
    let blob = world.seal(&spec("feanor", 1), &payload(40), true, SealOptions::default())?;
    assert_every_mutation_refused(&world, &blob);
    Ok(())
}

#[test]
fn every_byte_flip_and_truncation_is_refused_recipient_mode_hybrid() -> TestResult {
    let world = World::new()?;
    let options = SealOptions { suite: Suite::ChaCha20Poly1305, post_quantum: true };
    let blob = world.seal(&spec("feanor", 1), &payload(40), false, options)?;
    assert_every_mutation_refused(&world, &blob);
    Ok(())
}

#[test]
fn untrusted_publisher_is_refused() -> TestResult {
    let world = World::new()?;
    let stranger = PublisherSecretKey::generate()?;
    let recipients = [world.referee.identity.public_key()];
    let blob = seal(&spec("feanor", 1), b"x", &stranger, Delivery::Recipients(&recipients), SealOptions::default())?;
    let err = world.open(&blob).err();
    assert!(
        matches!(err, Some(OpenError::UntrustedPublisher { publisher }) if publisher == stranger.public_key().key_id()),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn signature_by_another_key_claiming_a_trusted_publisher_is_refused() -> TestResult {
    let world = World::new()?;
    let mut blob = world.seal(&spec("feanor", 1), b"x", true, SealOptions::default())?;
    // Sign the exact same bytes with a stranger's key, keeping the trusted publisher id.
    let stranger = PublisherSecretKey::generate()?;
    let stranger_file = stranger.to_file();
    let forger = ed25519_dalek::SigningKey::from_bytes(
        &hex::decode(stranger_file.lines().nth(1).unwrap_or_default())?
            .get(..32)
            .and_then(|s| <[u8; 32]>::try_from(s).ok())
            .ok_or("short key")?,
    );
    let signed_len = blob.len() - 64;
    let forged = ed25519_dalek::Signer::sign(&forger, blob.get(..signed_len).unwrap_or_default());
    blob.truncate(signed_len);
    blob.extend_from_slice(&forged.to_bytes());
    assert!(matches!(world.open(&blob), Err(OpenError::BadSignature { kind: SignatureKind::Ed25519, .. })));
    Ok(())
}

#[test]
fn revocations_are_refused_at_every_level() -> TestResult {
    let mut world = World::new()?;
    let v1 = world.seal(&spec("feanor", 1), b"x", true, SealOptions::default())?;
    let v2 = world.seal(&spec("feanor", 2), b"x", true, SealOptions::default())?;
    let id = world.open(&v1)?.header.muscle_id;

    world.trust.revoke_muscle(id, Some(1));
    assert!(matches!(world.open(&v1), Err(OpenError::VersionRevoked { version: 1, .. })));
    world.open(&v2)?;

    world.trust.revoke_muscle(id, None);
    assert!(matches!(world.open(&v2), Err(OpenError::MuscleRevoked { .. })));

    world.trust.revoke_publisher(world.publisher.public_key().key_id());
    assert!(matches!(world.open(&v2), Err(OpenError::PublisherRevoked { .. })));
    Ok(())
}

#[test]
fn rollback_to_a_lower_version_is_refused_but_the_same_version_reloads() -> TestResult {
    let mut world = World::new()?;
    let v3 = world.seal(&spec("feanor", 3), b"new", true, SealOptions::default())?;
    let v2 = world.seal(&spec("feanor", 2), b"old", true, SealOptions::default())?;
    let opened = world.open(&v3)?;
    world.trust.accept(&opened.header);
    world.open(&v3)?;
    let err = world.open(&v2).err();
    assert!(matches!(err, Some(OpenError::Rollback { version: 2, highest: 3, .. })), "{err:?}");
    // Another muscle name from the same publisher has its own mark.
    world.open(&world.seal(&spec("fingolfin", 1), b"x", true, SealOptions::default())?)?;
    Ok(())
}

#[test]
fn binding_to_another_referee_is_refused() -> TestResult {
    let world = World::new()?;
    let other = RefereeSecretKey::generate()?;
    let mut s = spec("feanor", 1);
    s.binding = Some(Binding::Referees(vec![other.key_id()]));
    let blob = world.seal(&s, b"x", true, SealOptions::default())?;
    let err = world.open(&blob).err();
    assert!(matches!(err, Some(OpenError::NotBoundHere { referee, .. }) if referee == world.referee.identity.key_id()));
    Ok(())
}

#[test]
fn wrong_or_missing_master_key_is_refused() -> TestResult {
    let world = World::new()?;
    let blob = world.seal(&spec("feanor", 1), b"x", true, SealOptions::default())?;
    let impostor = RefereeKeys {
        identity: RefereeSecretKey::from_file(&world.referee.identity.to_file())?,
        master: Some(MasterKey::generate()?),
    };
    assert!(matches!(open(&blob, &impostor, &world.trust), Err(OpenError::WrongMasterKey { .. })));
    let keyless =
        RefereeKeys { identity: RefereeSecretKey::from_file(&world.referee.identity.to_file())?, master: None };
    let err = open(&blob, &keyless, &world.trust).err();
    assert!(matches!(&err, Some(OpenError::WrongMasterKey { ours, .. }) if ours == "none"), "{err:?}");
    Ok(())
}

#[test]
fn recipient_mode_reaches_several_referees_and_no_one_else() -> TestResult {
    let world = World::new()?;
    let referees: Vec<RefereeSecretKey> = (0..3).map(|_| RefereeSecretKey::generate()).collect::<Result<_, _>>()?;
    let publics: Vec<RefereePublicKey> = referees.iter().map(RefereeSecretKey::public_key).collect();
    let blob = seal(
        &spec("feanor", 1),
        b"secret weights",
        &world.publisher,
        Delivery::Recipients(&publics),
        SealOptions::default(),
    )?;
    for identity in referees {
        let keys = RefereeKeys { identity, master: None };
        assert_eq!(open(&blob, &keys, &world.trust)?.payload.as_slice(), b"secret weights");
    }
    // A referee that is not a recipient is refused by the binding (which defaults to the recipients)...
    let outsider = RefereeKeys { identity: RefereeSecretKey::generate()?, master: None };
    assert!(matches!(open(&blob, &outsider, &world.trust), Err(OpenError::NotBoundHere { .. })));
    // ...and, with an `any` binding, by the missing recipient record.
    let mut any = spec("feanor", 1);
    any.binding = Some(Binding::Any);
    let blob = seal(&any, b"x", &world.publisher, Delivery::Recipients(&publics), SealOptions::default())?;
    assert!(matches!(open(&blob, &outsider, &world.trust), Err(OpenError::NotARecipient { .. })));
    Ok(())
}

#[test]
fn post_quantum_requirement_refuses_classical_only_muscles() -> TestResult {
    let world = World::new()?;
    let mut trust = MemoryTrust::default();
    trust.trust_post_quantum_only(world.publisher.public_key());
    let classical = world.seal(&spec("feanor", 1), b"x", true, SealOptions::default())?;
    assert!(matches!(open(&classical, &world.referee, &trust), Err(OpenError::PostQuantumRequired { .. })));
    let hybrid =
        world.seal(&spec("feanor", 1), b"x", true, SealOptions { suite: Suite::Aes256Gcm, post_quantum: true })?;
    open(&hybrid, &world.referee, &trust)?;
    Ok(())
}

#[test]
fn checks_run_in_the_documented_order() -> TestResult {
    // An untrusted publisher is reported before a bad signature or a wrong binding.
    let world = World::new()?;
    let stranger = PublisherSecretKey::generate()?;
    let mut s = spec("feanor", 1);
    s.binding = Some(Binding::Referees(vec![RefereeSecretKey::generate()?.key_id()]));
    let mut blob = seal(&s, b"x", &stranger, Delivery::MasterKey(&MasterKey::generate()?), SealOptions::default())?;
    let last = blob.len() - 1;
    if let Some(b) = blob.get_mut(last) {
        *b ^= 1;
    }
    assert!(matches!(world.open(&blob), Err(OpenError::UntrustedPublisher { .. })));
    Ok(())
}

#[test]
fn oversized_input_is_refused_before_parsing() -> TestResult {
    let world = World::new()?;
    let huge = vec![0u8; limits::MAX_MUSCLE_LEN + 1];
    assert!(matches!(world.open(&huge), Err(OpenError::Size { .. })));
    assert!(matches!(world.open(&[]), Err(OpenError::Size { .. })));
    Ok(())
}

#[test]
fn inspect_needs_no_keys() -> TestResult {
    let world = World::new()?;
    let blob = world.seal(&spec("feanor", 7), b"x", false, SealOptions::default())?;
    let sealed = SealedMuscle::parse(&blob)?;
    assert_eq!(sealed.header.name, "feanor");
    assert_eq!(sealed.header.version, 7);
    assert!(matches!(sealed.delivery, KeyDelivery::Recipients(ref r) if r.len() == 1));
    Ok(())
}
