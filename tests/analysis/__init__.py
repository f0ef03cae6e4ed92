"""Tests of :mod:`lora_monitor.analysis`, a module each."""
