# Shared by the bench scripts (sourced): the caller defines log() and die() first.

# install_missing command:package ... -> installs, with apt-get, the package of each
# command that is not on PATH (/usr/sbin included). One by one: a package that cannot be
# had is logged and skips only what needs it; the caller checks what it cannot do without.
install_missing() {
  export PATH=$PATH:/usr/sbin
  local need=() t p sudo=""
  for t in "$@"; do
    command -v "${t%%:*}" >/dev/null 2>&1 || need+=("${t#*:}")
  done
  [ ${#need[@]} -eq 0 ] && return
  log "installing ${need[*]}"
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq || true
  for p in "${need[@]}"; do
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$p" >/dev/null 2>&1 ||
      log "could not install $p"
  done
}

require() { # command ... -> dies naming the first one not on PATH
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || die "$t is required and could not be installed"
  done
}

free_ports() { # count -> that many distinct free ports on one line
  python3 -c 'import socket, sys
ss = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])' "$1"
}

wait_port() { # port, seconds -> 0 once something listens on 127.0.0.1:port, else 1
  local i
  for ((i = 0; i < $2 * 20; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}
