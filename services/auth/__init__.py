"""The auth service: captchas, sessions, real-name and portrait verification, lockouts."""
