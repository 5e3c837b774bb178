import sys

from facenet.train.launch import main

sys.exit(main())
