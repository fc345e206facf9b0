#!/bin/sh
# Lay the pytriton wheel's Triton out as the official image does: backends under
# /opt/tritonserver/backends (the python stub built for this image's Python) and `tritonserver` on
# PATH as a wrapper that puts the interpreter's libpython and the wheel's bundled libraries first
# (without them the stub loads no libpython, or another one, and model.py cannot import torch).
set -eu
# find_spec, not import: pytriton's own package imports its client's dependencies (gevent, …)
wheel=$(python -c 'import importlib.util as u; print(u.find_spec("pytriton").submodule_search_locations[0])')
server=$wheel/tritonserver
py=$(python -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
libdir=$(python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
mkdir -p /opt/tritonserver/backends/python
cp "$server/backends/python/libtriton_python.so" "$server/backends/python/triton_python_backend_utils.py" \
   "$server/python_backend_stubs/$py/triton_python_backend_stub" /opt/tritonserver/backends/python/
cat > /usr/local/bin/tritonserver <<WRAP
#!/bin/sh
export LD_LIBRARY_PATH="$libdir:$(dirname "$wheel")/nvidia_pytriton.libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$server/bin/tritonserver" --backend-directory=/opt/tritonserver/backends "\$@"
WRAP
chmod 755 /usr/local/bin/tritonserver
