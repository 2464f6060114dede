"""ResultStore implementations (results out). Each imports its client library only here."""
