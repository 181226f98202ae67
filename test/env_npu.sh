# Ascend (CANN) runtime environment for the CLIP launchers; sourced by test/train_clip_*.sh before Python looks for devices,
# because torch_npu cannot load until the CANN libraries are on the library path.
# Where CANN is absent it changes nothing and prints nothing, so the launchers can source it on any host.
# Variables already set by the user are kept. CANN_ROOT (default /usr/local/Ascend) is where CANN is installed.

_clip_root=${CANN_ROOT:-/usr/local/Ascend}
_clip_cann_env=""
if [ -z "${ASCEND_TOOLKIT_HOME:-}" ]; then # set_env.sh sets ASCEND_TOOLKIT_HOME: unset means not yet sourced
  for _clip_f in "$_clip_root/ascend-toolkit/set_env.sh" "$_clip_root/cann/set_env.sh" "$_clip_root/nnae/set_env.sh"; do
    if [ -f "$_clip_f" ]; then
      _clip_cann_env=$_clip_f
      break
    fi
  done
fi

if [ -n "$_clip_cann_env" ]; then
  # shellcheck disable=SC1090
  source "$_clip_cann_env" >/dev/null 2>&1
fi

if [ -n "${ASCEND_TOOLKIT_HOME:-}" ]; then
  # The driver's libraries are not always on the toolkit's path.
  for _clip_f in "$_clip_root/driver/lib64/common" "$_clip_root/driver/lib64/driver"; do
    case ":${LD_LIBRARY_PATH:-}:" in
      *":$_clip_f:"*) ;;
      *) [ -d "$_clip_f" ] && export LD_LIBRARY_PATH="$_clip_f${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
  done
  export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0} # device logs to files, not the train log
  export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}         # errors only
  export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}
  export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2} # host-side dispatch queue, level 2 as Ascend recommends
  export COMBINED_ENABLE=${COMBINED_ENABLE:-1}     # fuse non-contiguous copies
fi

unset _clip_root _clip_cann_env _clip_f
