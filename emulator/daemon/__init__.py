"""The array daemon: wires an Array, its NBD server and its management API."""
