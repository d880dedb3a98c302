"""Chaos harness: real ``antbatch worker`` processes under seeded fault schedules (issue 6)."""
