"""Tests of :mod:`lora_monitor.adapters`, a module each."""
