"""The FUSE side of tdefs: the daemon that serves a vault's backing tree through a
mount (fs, inodes, daemon, control) and the `tdefs` command (cli, cmd_vault,
cmd_mount). It does no crypto arithmetic: contents go through encfs.content."""
