//! A worknode whose behaviour is a sealed muscle in a referee cell.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use referee_muscle::MuscleSpec;
use referee_runtime::{Policy, Runtime, RuntimeOptions};
use referee_trust::Home;
use referee_worknode::{
    Authority, Behaviour, BehaviourError, Body, Consistency, Ctx, Envelope, MuscleBehaviour, Op, Signal, System,
    SystemConfig, WnPath,
};

const FEANOR: &str = include_str!("../../../../examples/feanor.wat");

/// Fëanor computed natively (the muscle's reference).
fn feanor_native(x: [f32; 4]) -> f32 {
    (x[0] * 0.5 + x[1] * -0.25 + (x[2] * 0.125 + (x[3] * 1.0 + 0.1))).max(0.0)
}

struct CountRestarts;

impl Behaviour for CountRestarts {
    fn handle(&self, ctx: &mut Ctx<'_>, msg: &Envelope) -> Result<(), BehaviourError> {
        if let Body::Signal(Signal::ChildRestarted { .. }) = msg.body {
            ctx.update("restarts", Op::Add(1));
        }
        Ok(())
    }
}

fn f32_bytes(v: &[f32]) -> Bytes {
    Bytes::from(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
}

#[test]
fn muscle_behaviour_runs_in_a_cell_and_bad_input_restarts_it() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::new(dir.path().join("home"));
    home.keygen().unwrap();
    let module = referee_compiler::compile(referee_compiler::SourceKind::Wat, FEANOR.as_bytes()).unwrap();
    let sealed = home.seal_for_self(&MuscleSpec::new("feanor", &[1, 4], &[1, 1]), &module.bytes).unwrap();
    let runtime = Arc::new(Runtime::open(&home, RuntimeOptions { policy: Policy::permissive_default() }).unwrap());
    runtime.load(&sealed).unwrap();

    let sys = System::builder(SystemConfig::default())
        .behaviour("feanor", Arc::new(MuscleBehaviour::new(runtime, "feanor", "y")))
        .behaviour("sup", Arc::new(CountRestarts))
        .start()
        .unwrap();
    let sup = sys.create(&Authority::System, &WnPath::root(), "sup", "sup", Consistency::Local).unwrap();
    let host = sys.create(&Authority::System, &"/sup".parse().unwrap(), "host", "feanor", Consistency::Local).unwrap();
    let x = [2.0, 1.5, -2.0, 3.0];
    sys.send_detached(&Authority::System, host, f32_bytes(&x)).unwrap();
    sys.send_detached(&Authority::System, host, f32_bytes(&[1.0, 2.0, 3.0])).unwrap(); // wrong shape: a failure
    assert!(sys.wait_idle(Duration::from_secs(30)));
    let state = sys.query(&Authority::System, host, Consistency::Local).unwrap().state.to_json();
    let y: Vec<f32> = serde_json::from_str(state["y"].as_str().unwrap()).unwrap();
    assert_eq!(y, vec![feanor_native(x)]);
    let sup_state = sys.query(&Authority::System, sup, Consistency::Local).unwrap().state.to_json();
    assert_eq!(sup_state["restarts"], 1);
}
