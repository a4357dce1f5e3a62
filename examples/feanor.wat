;; feanor.wat: the seeds' Fëanor, 4 inputs -> 1 output with ReLU, written by hand against
;; ABI v1 (docs/muscle-abi.md).
;; Seal and run it:
;;   referee compile examples/feanor.wat -o feanor.muscle --input-shape 1,4 --output-shape 1,1
;;   referee run feanor.muscle --input '[1, 2, 3, 4]'
(module
  (memory (export "memory") 1)
  (func (export "input_ptr") (result i32) i32.const 0)
  (func (export "output_ptr") (result i32) i32.const 16)
  ;; forward(in, out): out[0] = relu(0.5 x0 - 0.25 x1 + 0.125 x2 + 1.0 x3 + 0.1); status 0.
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
