"""Reusable Lightning callbacks: dynamic sparse training, auxiliary-objective schedule, memory profiling."""
