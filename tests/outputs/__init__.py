"""Tests of :mod:`lora_monitor.outputs`, a module each."""
