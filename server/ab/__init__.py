"""The A/B router: assignment, recording, statistics, decisions."""
