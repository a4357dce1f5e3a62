"""feanor.py: Fëanor, a 4 → 1 linear model with ReLU (the seeds' first muscle), in the NumPy subset.

    referee compile examples/feanor.py -o feanor.muscle
    referee run feanor.muscle --input '[1, 2, 3, 4]'

Same weights as examples/feanor.wat; `python3 examples/feanor.py` runs it with NumPy.
"""
import numpy as np

W = np.array([[0.5], [-0.25], [0.125], [1.0]], dtype=np.float32)
B = np.array([0.1], dtype=np.float32)


def forward(x):
    return np.maximum(x @ W + B, 0.0)


if __name__ == "__main__":
    print(forward(np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)))
