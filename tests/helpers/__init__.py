"""Test fakes and builders shared by unit and integration tests."""
