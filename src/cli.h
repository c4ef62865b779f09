/* cli — the client commands: status, start, stop, restart, logs, reload.
 *
 * They talk HTTP to the daemon over its control socket (libcurl with
 * CURLOPT_UNIX_SOCKET_PATH). Exit codes: 0 ok, 1 the operation failed,
 * 2 usage, 3 the daemon is not running, 4 unknown model. */
#ifndef LLAMA_POOL_CLI_H
#define LLAMA_POOL_CLI_H

enum cli_exit {
    CLI_OK = 0,
    CLI_FAILED = 1,
    CLI_USAGE = 2,
    CLI_NO_DAEMON = 3,
    CLI_UNKNOWN_MODEL = 4,
};

/* argv[0] is the subcommand ("status", …). SOCKET may be NULL: then
 * $LLAMA_POOL_SOCKET, then the config's control_socket. */
int cli_run(int argc, char **argv, const char *socket, const char *config);

#endif
