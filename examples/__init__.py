"""Small apps that use the project's libraries, each run by a test in tests/examples/."""
