"""Signed model bundles: building, accuracy checks, Polygraphy files, and
publishing them where devices fetch them."""
