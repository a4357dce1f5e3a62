;; linear-trainable.wat: y = w . x + b over 4 inputs, trained by SGD on squared error.
;; A stateful muscle under ABI v1: parameters live at state_ptr and persist across calls.
;;   referee compile examples/linear-trainable.wat -o lin.muscle --input-shape 1,4 --output-shape 1,1
;;   referee run lin.muscle --entry train --input '[1,0,0,0]' --target '[2]' --lr 0.1
(module
  (memory (export "memory") 1)
  ;; layout: x at 0 (16 bytes), y at 16 (4), out at 32 (4), state w0..w3,b at 64 (20)
  (func (export "input_ptr") (result i32) i32.const 0)
  (func (export "target_ptr") (result i32) i32.const 16)
  (func (export "output_ptr") (result i32) i32.const 32)
  (func (export "state_ptr") (result i32) i32.const 64)
  (func (export "state_len") (result i32) i32.const 20)

  (func $predict (param $x i32) (result f32)
    (f32.add
      (f32.add
        (f32.add (f32.mul (f32.load (local.get $x)) (f32.load (i32.const 64)))
                 (f32.mul (f32.load offset=4 (local.get $x)) (f32.load (i32.const 68))))
        (f32.add (f32.mul (f32.load offset=8 (local.get $x)) (f32.load (i32.const 72)))
                 (f32.mul (f32.load offset=12 (local.get $x)) (f32.load (i32.const 76)))))
      (f32.load (i32.const 80))))

  (func (export "forward") (param $in i32) (param $out i32) (result i32)
    (f32.store (local.get $out) (call $predict (local.get $in)))
    i32.const 0)

  ;; train(x, y, lr): one SGD step on (w.x + b - y)^2; returns the loss before the step.
  (func (export "train") (param $x i32) (param $y i32) (param $lr f32) (result f32)
    (local $err f32) (local $g f32) (local $i i32)
    (local.set $err (f32.sub (call $predict (local.get $x)) (f32.load (local.get $y))))
    ;; g = 2 * err * lr
    (local.set $g (f32.mul (f32.mul (f32.const 2) (local.get $err)) (local.get $lr)))
    (local.set $i (i32.const 0))
    (block $done
      (loop $each
        (br_if $done (i32.ge_u (local.get $i) (i32.const 4)))
        (f32.store
          (i32.add (i32.const 64) (i32.shl (local.get $i) (i32.const 2)))
          (f32.sub
            (f32.load (i32.add (i32.const 64) (i32.shl (local.get $i) (i32.const 2))))
            (f32.mul (local.get $g)
                     (f32.load (i32.add (local.get $x) (i32.shl (local.get $i) (i32.const 2)))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each)))
    (f32.store (i32.const 80) (f32.sub (f32.load (i32.const 80)) (local.get $g)))
    (f32.mul (local.get $err) (local.get $err))))
