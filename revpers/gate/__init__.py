"""The identity gate: after generation, re-identify each output face against its input with
recognizers other than the generator's, retry or fall back when one still matches, and record an
audit of what was released (docs/verification.md)."""
