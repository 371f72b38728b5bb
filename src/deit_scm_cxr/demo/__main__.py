"""`python -m deit_scm_cxr.demo --model outputs/wsol`: the Gradio demo."""

from deit_scm_cxr.demo.app import main

if __name__ == "__main__":
    main()
