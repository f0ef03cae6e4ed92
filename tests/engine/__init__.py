"""Tests of :mod:`lora_monitor.engine`, a module each."""
