"""What every filter shares: config, message model, verdicts, AR writer, adapter, runner."""
