"""Engines that load through mmapload (each optional: importing mmapload never imports them).

- ``vllm``: the ``--load-format mmapload`` model loader, registered through the
  ``vllm.general_plugins`` entry point (``pip install "mmapload[vllm]"``).
"""
