;; feanor.wat: the seeds' Fëanor, 4 inputs -> 1 output with ReLU, written by hand in WAT.
;; Seal it:  referee compile examples/feanor.wat -o feanor.muscle --input-shape 1,4 --output-shape 1,1
(module
  (import "referee" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  ;; forward(in, out): reads 4 f32 at `in`, writes relu(w . x + b) at `out`.
  (func (export "forward") (param $in i32) (param $out i32) (result i32)
    local.get $out
    (f32.add
      (f32.add (f32.mul (f32.load (local.get $in)) (f32.const 0.5))
               (f32.mul (f32.load offset=4 (local.get $in)) (f32.const -0.25)))
      (f32.add (f32.mul (f32.load offset=8 (local.get $in)) (f32.const 0.125))
               (f32.add (f32.mul (f32.load offset=12 (local.get $in)) (f32.const 1.0))
                        (f32.const 0.1))))
    f32.const 0
    f32.max
    f32.store
    i32.const 0))
