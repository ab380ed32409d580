"""Explicit (Megatron-style) parallelism: process groups, collectives, parallel layers."""
