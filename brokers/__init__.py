"""Broker implementations (tasks in). Each imports its client library only here."""
