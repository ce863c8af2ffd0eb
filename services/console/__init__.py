"""The bureau console: staff work in a web page; every action is a signed command."""
