"""Pure spectral math: tensors in, frozen dataclasses / numbers out. No I/O, no project imports."""
